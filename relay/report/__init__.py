"""`relay report`: the legacy-versus-new comparison, computed from delivery logs alone.

Import from the module that owns a name; this package re-exports nothing, so that
importing the command (every `relay` invocation does) loads no renderer:

    reasons   reason classes of refusals and deferrals (`classify_reason`)
    model     the data model (`Report` and its parts, `Thresholds`, `PairRow`)
    format    formatting shared by the outputs (counts, rates, times, SMTP replies)
    divergences   divergences grouped by reply (`group_divergences`, `worst`)
    figures   counters → rates, percentiles, the pilot comparison and verdicts;
              `load_thresholds`
    inputs    the log files (order, gzip) and the time window (`parse_bound`)
    logs      reading and folding the logs: `build_report`
    text, json, csv, html   one output format each (`render_*`, `write_csv`)
    command   the click command, `report_command`

Each module imports only those listed above it. See docs/report.md.
"""
