// For experiments/floors.py only: what recording every op in C++ costs (not used by memprof).
//
// A thread-local RecordFunction callback on every aten op (scope FUNCTION) that appends the op's name id
// and start/end times, and for each output tensor its storage, data pointer, bytes, dtype and shape: the
// per-op facts memprof's dispatch-mode ledger takes from Python, taken in C++ instead. Built and loaded
// like memprof/tracking/alloc_events.cpp (memprof.tracking.native.build).

#include <ATen/record_function.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {
struct Log {
  std::vector<int64_t> v;
  std::mutex mu;
  std::unordered_map<std::string, int64_t> names;
};
std::shared_ptr<Log> g_log;
at::CallbackHandle g_cb = 0;

inline int64_t now_ns() { return std::chrono::steady_clock::now().time_since_epoch().count(); }

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  auto log = g_log;
  if (!log) return nullptr;
  std::lock_guard<std::mutex> g(log->mu);
  auto it = log->names.find(fn.name());
  int64_t id = it == log->names.end() ? log->names.emplace(fn.name(), log->names.size()).first->second : it->second;
  log->v.insert(log->v.end(), {1, id, now_ns()});
  return nullptr;
}

void put_tensor(Log& log, const at::Tensor& t) {
  if (!t.defined() || !t.has_storage()) return;
  const auto& st = t.storage();
  log.v.insert(log.v.end(), {3, reinterpret_cast<int64_t>(st.unsafeGetStorageImpl()),
                             reinterpret_cast<int64_t>(st.data()), static_cast<int64_t>(st.nbytes()),
                             static_cast<int64_t>(t.scalar_type()), t.dim()});
  for (auto s : t.sizes()) log.v.push_back(s);
}

void on_end(const at::RecordFunction& fn, at::ObserverContext*) {
  auto log = g_log;
  if (!log) return;
  std::lock_guard<std::mutex> g(log->mu);
  log->v.insert(log->v.end(), {2, now_ns()});
  for (const auto& o : fn.outputs()) {
    if (o.isTensor()) put_tensor(*log, o.toTensor());
    else if (o.isTensorList()) for (const auto& t : o.toTensorList()) put_tensor(*log, t);
  }
}
}  // namespace

extern "C" {
int op_tracer_start() {
  try {
    if (g_log) return -1;
    g_log = std::make_shared<Log>();
    g_log->v.reserve(1 << 18);
    g_cb = at::addThreadLocalCallback(
        at::RecordFunctionCallback(on_start, on_end).needsOutputs(true).scopes({at::RecordScope::FUNCTION}));
    return 0;
  } catch (...) {
    return -1;
  }
}

int64_t op_tracer_stop() {
  try {
    if (!g_log) return -1;
    at::removeCallback(g_cb);
    g_cb = 0;
    int64_t n = static_cast<int64_t>(g_log->v.size());
    g_log.reset();
    return n;
  } catch (...) {
    return -1;
  }
}
}
