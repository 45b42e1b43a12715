//! The panes below and over the table: history (sparklines on one time axis, caps as digits
//! on the same axis), the event log, the detail of one process, and the help.
use immp_model::{
    ProcId,
    text::{clean, column},
    units::{fmt_bytes, fmt_rate},
};
use ratatui::{
    Frame,
    layout::Rect,
    style::Style,
    text::{Line, Span},
    widgets::{Block, Borders, Clear, Paragraph, Wrap},
};

use super::{
    draw::{brief, mb, pct},
    history::History,
    state::App,
    theme::Theme,
};

const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

/// Width of the labels left of the sparklines.
const LABEL: usize = 26;

/// Columns of `values` (oldest first) for `width` cells: one slot per cell while they fit,
/// else the highest of each run of slots (peaks matter more than means here). Newest last.
fn buckets<T: Copy + PartialOrd + Default>(values: &[T], width: usize) -> Vec<T> {
    if width == 0 || values.is_empty() {
        return Vec::new();
    }
    let per = values.len().div_ceil(width);
    let mut v: Vec<T> = values
        .rchunks(per)
        .map(|c| {
            c.iter()
                .copied()
                .fold(T::default(), |a, b| if b > a { b } else { a })
        })
        .collect();
    v.reverse();
    v
}

fn bar(v: f32, scale: f32) -> char {
    if v <= 0.0 || scale <= 0.0 {
        return ' ';
    }
    let level = (v / scale * 8.0).ceil().clamp(1.0, 8.0) as usize;
    BARS[level - 1]
}

/// One sparkline, right-aligned in `width` cells; slots under a cap drawn with `capped`.
fn spark<'a>(
    dirty: &[f32],
    cap: Option<&[f32]>,
    width: usize,
    scale: f32,
    t: &Theme,
) -> Vec<Span<'a>> {
    let d = buckets(dirty, width);
    let c = cap.map(|c| buckets(c, width));
    let mut spans = vec![Span::raw(" ".repeat(width.saturating_sub(d.len())))];
    let mut run = String::new();
    let mut run_capped = false;
    for (i, v) in d.iter().enumerate() {
        let capped = c.as_ref().is_some_and(|c| c[i] > 0.0);
        if capped != run_capped && !run.is_empty() {
            spans.push(styled(std::mem::take(&mut run), run_capped, t));
        }
        run_capped = capped;
        run.push(bar(*v, scale));
    }
    spans.push(styled(run, run_capped, t));
    spans
}

fn styled<'a>(s: String, capped: bool, t: &Theme) -> Span<'a> {
    Span::styled(
        s,
        if capped {
            t.capped_slot()
        } else {
            Style::new()
        },
    )
}

/// The caps strip: the number of caps in force per cell (`·` none), on the same axis.
fn caps_strip(h: &History, width: usize) -> String {
    let c = buckets(&h.caps(), width);
    let mut s = " ".repeat(width.saturating_sub(c.len()));
    s.extend(c.iter().map(|n| match n {
        0 => '·',
        1..=9 => char::from(b'0' + n),
        _ => '+',
    }));
    s
}

/// The processes the history shows: the selected one first, then the busiest now.
fn shown(app: &App, n: usize) -> Vec<(ProcId, String, f64)> {
    let mut v: Vec<(ProcId, String, f64)> = Vec::new();
    let Some(d) = app.data() else { return v };
    let sel = app
        .selected()
        .filter(|r| app.history().trace(&r.id()).is_some());
    for r in sel.into_iter().chain(d.rows.iter()) {
        if v.len() == n {
            break;
        }
        let dirtied = app.history().peak(&r.id()) > 0.0;
        if dirtied && !v.iter().any(|x| x.0 == r.id()) {
            v.push((r.id(), r.p().comm.clone(), r.p().dirty_bytes_per_s));
        }
    }
    v
}

pub fn history(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let h = app.history();
    let span = h.span_s();
    let title = format!(
        " history · last {} · MB/s now · underlined: capped ",
        human_secs(span)
    );
    let block = Block::new()
        .borders(Borders::TOP)
        .title(Line::styled(title, t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    if inner.height == 0 || h.is_empty() {
        return;
    }
    let width = (inner.width as usize).saturating_sub(LABEL + 1);
    let total = h.total();
    let link_max = h.link().iter().copied().fold(0.0, f32::max);
    let scale = total.iter().copied().fold(link_max, f32::max);
    let mut lines = Vec::new();
    let now_total = total.last().copied().unwrap_or(0.0) as f64;
    let mut l = vec![label("guest total", now_total, t)];
    l.extend(spark(&total, None, width, scale, t));
    lines.push(Line::from(l));
    let rows = (inner.height as usize).saturating_sub(2);
    let procs: Vec<_> = shown(app, rows)
        .into_iter()
        .filter_map(|(id, comm, now)| Some((id, comm, now, h.trace(&id)?)))
        .collect();
    // One scale for every process row, so that their heights compare (the total has its own,
    // where a full bar is the link, or the peak when the guest dirtied faster).
    let top = procs
        .iter()
        .flat_map(|p| p.3.dirty.iter().copied())
        .fold(0.0, f32::max);
    for (id, comm, now, tr) in procs {
        let name = format!("{} {}", id.pid, column(&comm, 12));
        let mut l = vec![label(&name, now, t)];
        l.extend(spark(&tr.dirty, Some(&tr.cap), width, top, t));
        lines.push(Line::from(l));
    }
    lines.push(Line::from(vec![
        Span::styled(format!("{:<w$} ", "caps in force", w = LABEL), t.label()),
        Span::styled(caps_strip(h, width), t.cap()),
    ]));
    f.render_widget(Paragraph::new(lines), inner);
}

fn label<'a>(name: &str, rate: f64, t: &Theme) -> Span<'a> {
    let w = LABEL - 7;
    Span::styled(
        format!("{:<w$} {:>6} ", column(name, w), mb(rate)),
        t.label(),
    )
}

fn human_secs(s: f64) -> String {
    if s >= 120.0 {
        format!("{:.0}m{:02.0}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.0}s")
    }
}

pub fn log(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let block = Block::new()
        .borders(Borders::TOP)
        .title(Line::styled(" events ", t.title()));
    let inner = block.inner(area);
    f.render_widget(block, area);
    let n = inner.height as usize;
    let log = app.log();
    let lines: Vec<Line> = log
        .iter()
        .skip(log.len().saturating_sub(n))
        .map(|l| {
            let times = if l.repeat > 1 {
                format!(" (x{})", l.repeat)
            } else {
                String::new()
            };
            Line::from(vec![
                Span::styled(format!("{} ", (app.clock)(l.time_ms)), t.dim()),
                Span::styled(format!("{}{times}", l.text), t.log(l.kind)),
            ])
        })
        .collect();
    f.render_widget(Paragraph::new(lines), inner);
}

/// A box `w` x `h` centred in `area` (clipped to it).
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

const HELP: [(&str, &str); 17] = [
    (
        "q  Esc  Ctrl-C",
        "quit (lifts every cap set here, unless --keep-caps)",
    ),
    ("Up/Down  j/k", "select a process (PgUp/PgDn, g/G: jump)"),
    (
        "Enter",
        "details of the selected process (Enter/Esc closes)",
    ),
    (
        "c",
        "cap the selected process: percent of one CPU, as --cap",
    ),
    (
        "u",
        "lift its cap (the automatic policy then leaves it alone)",
    ),
    ("a", "automatic policy on/off (needs the bandwidth)"),
    ("b", "set the link bandwidth (100Mbit, 1Gbit, 12.5MB/s)"),
    ("s  Left/Right", "sort column"),
    ("I", "invert the sort order"),
    ("/", "filter by name or PID (Esc in the prompt clears it)"),
    ("f", "freeze the display (collection and caps go on)"),
    ("+  -", "longer / shorter interval"),
    ("?", "this help (any key closes it)"),
    ("", ""),
    (
        "verdict",
        "immp: dirties >= the IMMP share of the link; writer; quiet; gone",
    ),
    (
        "MEAS",
        "exact: soft-dirty count; bound: lower bound (rewrites unseen)",
    ),
    (
        "CAP",
        "cap in % of one CPU; A / auto: set by the automatic policy",
    ),
];

pub fn help(f: &mut Frame, t: &Theme, area: Rect) {
    let r = centered(area, 84, HELP.len() as u16 + 4);
    let lines: Vec<Line> = HELP
        .iter()
        .map(|(k, v)| {
            Line::from(vec![
                Span::styled(format!("{k:<15} "), t.label()),
                Span::raw(*v),
            ])
        })
        .collect();
    let block = Block::bordered().title(Line::styled(" keys (immp top) ", t.title()));
    f.render_widget(Clear, r);
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        r,
    );
}

pub fn detail(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let Some(r) = app.selected() else { return };
    let r = r.clone();
    let p = r.p();
    let w = area.width.saturating_sub(4).min(120);
    let rect = centered(area, w, area.height);
    let gone = if r.gone_for > 0 { " (exited)" } else { "" };
    let title = format!(
        " PID {} {}{gone} (Enter/Esc closes) ",
        p.pid,
        clean(&p.comm)
    );
    let block = Block::bordered().title(Line::styled(title, t.title()));
    let lines = detail_lines(app, &r, t);
    f.render_widget(Clear, rect);
    f.render_widget(
        Paragraph::new(lines)
            .block(block)
            .wrap(Wrap { trim: false }),
        rect,
    );
}

fn kv<'a>(k: &str, v: String, t: &Theme) -> Line<'a> {
    Line::from(vec![
        Span::styled(format!("{k:<10} "), t.label()),
        Span::raw(v),
    ])
}

fn detail_lines<'a>(app: &App, r: &super::data::Row, t: &Theme) -> Vec<Line<'a>> {
    let p = r.p();
    let Some(d) = app.data() else {
        return Vec::new();
    };
    let page = d.snap.page_size as f64;
    let cmd = if p.cmdline.is_empty() {
        &p.comm
    } else {
        &p.cmdline
    };
    let mut v = vec![
        kv("command", clean(cmd).into_owned(), t),
        kv("dirty", dirty(r), t),
        kv("faults/s", faults(p, page), t),
        kv("curve", curve(p, page), t),
        kv("impact", impact(app, d, &r.id()), t),
        kv("cgroup", cgroup(app, p), t),
    ];
    if let Some(tr) = app.history().trace(&r.id()) {
        let top = tr.dirty.iter().copied().fold(0.0, f32::max);
        let mut l = vec![Span::styled(format!("{:<10} ", "history"), t.label())];
        l.extend(spark(&tr.dirty, Some(&tr.cap), 60, top, t));
        l.push(Span::raw(format!(" peak {}", fmt_rate(top as f64))));
        v.push(Line::from(l));
    }
    v.push(Line::styled(
        "policy decisions about it (newest last):",
        t.label(),
    ));
    let mut any = false;
    for (ms, text) in app.decisions(&r.id()) {
        any = true;
        v.push(Line::from(format!("  {} {text}", (app.clock)(*ms))));
    }
    if !any {
        let why = if app.settings.auto {
            "none yet"
        } else {
            "none (automatic policy off: a)"
        };
        v.push(Line::from(format!("  {why}")));
    }
    v
}

fn dirty(r: &super::data::Row) -> String {
    let p = r.p();
    let how = if p.exact {
        "exact count"
    } else {
        "lower bound"
    };
    let share = r.r.link_share.map_or(String::new(), |s| {
        format!(" = {:.0}% of the link", s * 100.0)
    });
    let clamped = if p.clamped {
        ", cut to its resident set"
    } else {
        ""
    };
    format!(
        "{} ({how}{clamped}){share}; CPU {:.1}%, RSS {}",
        fmt_rate(p.dirty_bytes_per_s),
        p.cpu_pct,
        fmt_bytes(p.rss_bytes as f64)
    )
}

/// Fault classes, per second and as bytes.
fn faults(p: &immp_model::snapshot::ProcSample, page: f64) -> String {
    let r = &p.rates;
    let one = |n: f64| format!("{n:.0} ({})", fmt_rate(n * page));
    let mut s = format!(
        "new pages {}, write-protect {}, page cache {}, shmem {}, reads {:.0}",
        one(r.write_new),
        one(r.write_protect),
        one(r.pagecache),
        one(r.shmem),
        r.read
    );
    if r.write_repeat > 0.0 {
        s.push_str(&format!(", repeats {:.0} (not counted)", r.write_repeat));
    }
    s
}

fn curve(p: &immp_model::snapshot::ProcSample, page: f64) -> String {
    if p.curve.is_empty() {
        return "not measured (immp profile --curve measures it)".into();
    }
    let pts: Vec<String> = p
        .curve
        .iter()
        .map(|c| format!("{:.2}s {}", c.window_s, fmt_bytes(c.pages * page)))
        .collect();
    pts.join(", ")
}

fn impact(app: &App, d: &super::data::Data, id: &ProcId) -> String {
    if app.settings.bandwidth.is_none() {
        return "needs the link bandwidth (b)".into();
    }
    let Some((_, i)) = d.impact.as_ref().filter(|(x, _)| x == id) else {
        return "not computed: it dirtied nothing in this interval".into();
    };
    let cap = match i.cap_to_converge {
        Some(c) => format!("cap to converge: {} (alone)", pct(c)),
        None if d.now.is_some_and(|p| p.converges) => {
            "no cap needed: the migration converges".into()
        }
        None => "no cap of it alone makes the migration converge".into(),
    };
    format!(
        "without it the migration takes {}; {cap}",
        brief(&i.without_it)
    )
}

fn cgroup(app: &App, p: &immp_model::snapshot::ProcSample) -> String {
    let mut s = clean(&p.cgroup).into_owned();
    if let Some(c) = app.caps().get(&p.id()) {
        let by = match c.by {
            super::data::CapBy::Operator => "by you",
            super::data::CapBy::Policy => "by the automatic policy",
        };
        s.push_str(&format!("; capped at {} {by} ({}", pct(c.pct), c.mechanism));
        if !c.cgroup.is_empty() {
            s.push_str(&format!(" in {}", clean(&c.cgroup)));
        }
        s.push(')');
    } else if app.exempt().contains(&p.id()) {
        s.push_str("; not capped (lifted by you: the policy leaves it alone)");
    }
    s
}
