// Allocator events recorded in C++ (see memprof/tracking/native.py, which builds and loads this file).
//
// PyTorch's allocators (the CPU allocator, CUDA's caching allocator) report every allocation and free to
// whatever c10::MemoryReportingInfoBase sits in the thread-local debug-info slot PROFILER_STATE; that is how
// torch.profiler(profile_memory=True) sees them. A Recorder put in that slot appends (pointer, bytes,
// device) for each report to its buffer: no Python runs per allocation. Autograd's worker threads inherit
// the slot from the thread that started backward, as torch.profiler's state does.
//
// The Recorder is a ProfilerStateBase (with a disabled profiler config), not a bare MemoryReportingInfoBase:
// torch reads that slot as a ProfilerStateBase wherever it asks whether a profiler runs on this thread
// (torch.autograd._profiler_enabled(), torch.profiler starting), and a bare reporter there would be read as
// the wrong type. As a disabled profiler state it answers "no profiler is enabled", and torch.profiler asked
// to start inside it refuses with its usual "Profiler is already enabled on this thread".
//
// Plain C functions (loaded with ctypes): no pybind11, so the file builds in a few seconds against the
// installed torch's headers. No C++ exception crosses them: failures are negative return values.

#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/csrc/profiler/orchestration/observer.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace {

namespace prof = torch::profiler::impl;

struct Recorder : public prof::ProfilerStateBase {
  Recorder() : prof::ProfilerStateBase(prof::ProfilerConfig(prof::ProfilerState::Disabled)) {}
  std::vector<int64_t> buf;  // three int64 per event: pointer, bytes (negative on free), device
  int64_t n = 0;             // events so far, read in place by Python (memprof_rec_count_address)
  std::mutex mu;             // autograd worker threads report too
  void reportMemoryUsage(void* ptr, int64_t alloc_size, size_t, size_t, c10::Device device) override {
    std::lock_guard<std::mutex> guard(mu);
    buf.push_back(reinterpret_cast<int64_t>(ptr));
    buf.push_back(alloc_size);
    buf.push_back(static_cast<int64_t>(device.type()) * 65536 + static_cast<int64_t>(device.index()) + 1);
    ++n;
  }
  bool memoryProfilingEnabled() const override { return true; }
  prof::ActiveProfilerType profilerType() override { return prof::ActiveProfilerType::NONE; }
};

using Handle = std::shared_ptr<Recorder>;

}  // namespace

extern "C" {

// A new recorder, installed on the calling thread; nullptr when the slot is taken (torch.profiler or
// another recorder runs on this thread) or on any failure.
void* memprof_rec_start() {
  try {
    if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != nullptr) return nullptr;
    auto rec = std::make_shared<Recorder>();
    rec->buf.reserve(3 << 12);
    c10::ThreadLocalDebugInfo::_push(c10::DebugInfoKind::PROFILER_STATE, rec);
    return new Handle(std::move(rec));
  } catch (...) {
    return nullptr;
  }
}

// Take the recorder out of the calling thread's slot: 0, or -1 when the slot holds something else (it is
// then left alone) or on failure. Events can still be read afterwards.
int memprof_rec_stop(void* h) {
  try {
    auto& rec = *static_cast<Handle*>(h);
    if (c10::ThreadLocalDebugInfo::get(c10::DebugInfoKind::PROFILER_STATE) != rec.get()) return -1;
    c10::ThreadLocalDebugInfo::_pop(c10::DebugInfoKind::PROFILER_STATE);
    return 0;
  } catch (...) {
    return -1;
  }
}

// Number of events recorded so far.
int64_t memprof_rec_count(void* h) {
  auto& rec = *static_cast<Handle*>(h);
  std::lock_guard<std::mutex> guard(rec->mu);
  return static_cast<int64_t>(rec->buf.size() / 3);
}

// Where the recorder keeps its count of events: read in place, a check for new events costs no call.
void* memprof_rec_count_address(void* h) { return &(*static_cast<Handle*>(h))->n; }

// Copy events [first, first + n) into out (3 * n int64); returns how many were copied.
int64_t memprof_rec_read(void* h, int64_t first, int64_t n, int64_t* out) {
  auto& rec = *static_cast<Handle*>(h);
  std::lock_guard<std::mutex> guard(rec->mu);
  int64_t have = static_cast<int64_t>(rec->buf.size() / 3) - first;
  int64_t m = std::max<int64_t>(0, std::min<int64_t>(n, have));
  std::copy(rec->buf.begin() + 3 * first, rec->buf.begin() + 3 * (first + m), out);
  return m;
}

// The running maximum of the bytes recorded, above the start, and where the sum ended: what an op made and
// kept, and the most it held at once (without copying the events out).
void memprof_rec_peak(void* h, int64_t* peak, int64_t* end) {
  auto& rec = *static_cast<Handle*>(h);
  std::lock_guard<std::mutex> guard(rec->mu);
  int64_t run = 0, top = 0;
  for (size_t i = 1; i < rec->buf.size(); i += 3) {
    run += rec->buf[i];
    top = std::max(top, run);
  }
  *peak = top;
  *end = run;
}

void memprof_rec_free(void* h) { delete static_cast<Handle*>(h); }

}  // extern "C"
