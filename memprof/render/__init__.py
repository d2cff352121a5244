"""Reading a profile for people: report rows, comparisons, tables as text, figures and the HTML page.

Computing and rendering are separate modules: :mod:`.rows` and :mod:`.diff` compute frozen records from a
:class:`~memprof.profiles.Profile` (bytes stay ``int``); :mod:`.tables`, :mod:`.report_text`,
:mod:`.report_csv` and :mod:`.diff_text` turn them into text; :mod:`.plot_data` computes what each figure
draws, :mod:`.plot_figures` draws it with matplotlib and :mod:`.html_page` writes the self-contained page.
The public entry points are :mod:`memprof.report` and :mod:`memprof.plots`.

Limits: nothing here imports torch or the tracker; it reads profiles only (a plan for the frontier figure).
"""
