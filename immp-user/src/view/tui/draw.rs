//! The screen: header, process table, history, event log, status bar, and the help and
//! detail panes over them. Reads `App` only (the table's scroll position is the one thing it
//! remembers, in a `Cell`). Fits 80x24; wider and taller screens get more columns and rows.
use immp_model::{
    predict::Prediction,
    text::{clean, column},
    units::{fmt_bytes, fmt_duration, fmt_rate},
};
use ratatui::{
    Frame,
    layout::{Constraint, Layout, Rect},
    style::Style,
    text::{Line, Span},
    widgets::{Block, Borders, Cell, HighlightSpacing, Paragraph, Row, Table, TableState, Wrap},
};

use super::{
    data::{CapBy, CapView, Data, Row as DataRow, SortKey},
    panes,
    state::{App, PromptKind},
    theme::Theme,
};

/// Screen areas.
struct Areas {
    header: Rect,
    table: Rect,
    history: Rect,
    log: Rect,
    status: Rect,
}

fn areas(area: Rect) -> Areas {
    let rows = (area.height * 3 / 8).clamp(8, 18);
    let [header, table, bottom, status] = Layout::vertical([
        Constraint::Length(4),
        Constraint::Min(5),
        Constraint::Length(rows),
        Constraint::Length(1),
    ])
    .areas(area);
    // Wide: history and log side by side; else history above a short log.
    let [history, log] = if area.width >= 140 {
        Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(bottom)
    } else {
        Layout::vertical([
            Constraint::Length((rows * 5 / 9).max(5)),
            Constraint::Fill(1),
        ])
        .areas(bottom)
    };
    Areas {
        header,
        table,
        history,
        log,
        status,
    }
}

pub fn draw(f: &mut Frame, app: &App) {
    let t = Theme { color: app.color };
    let a = areas(f.area());
    header(f, app, &t, a.header);
    table(f, app, &t, a.table);
    panes::history(f, app, &t, a.history);
    panes::log(f, app, &t, a.log);
    status(f, app, &t, a.status);
    match app.overlay {
        super::state::Overlay::Help => panes::help(f, &t, f.area()),
        super::state::Overlay::Detail => panes::detail(f, app, &t, a.table.union(a.history)),
        super::state::Overlay::None => {}
    }
}

// --- header ---

fn header(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let lines = vec![
        mode_line(app, t),
        link_line(app, t, area.width),
        prediction_line(app, t),
        policy_line(app, t),
    ];
    f.render_widget(Paragraph::new(lines), area);
}

fn mode_line<'a>(app: &'a App, t: &Theme) -> Line<'a> {
    let mut v = vec![Span::styled("immp top ", t.title())];
    if app.frozen() {
        v.push(Span::styled("FROZEN (f) ", t.warn()));
    }
    let Some(d) = app.data() else {
        let wait = format!(
            "waiting for the first interval ({})",
            fmt_duration(app.settings.interval)
        );
        v.push(Span::raw(wait));
        return Line::from(v);
    };
    let s = &d.snap;
    let (word, style) = match s.mode {
        immp_model::snapshot::Mode::Exact => ("exact", t.good()),
        immp_model::snapshot::Mode::Bounds => ("lower bound", t.warn()),
    };
    v.push(Span::styled(word, style));
    let armed = match s.mode {
        immp_model::snapshot::Mode::Exact => format!(", {} armed", s.exact_armed),
        immp_model::snapshot::Mode::Bounds => String::new(),
    };
    v.push(Span::raw(format!(
        " ({}{armed}) ",
        clean(&app.settings.mode_why)
    )));
    let probes = match &s.probes_fallback {
        Some(_) => "tracepoint probes (BTF failed)".to_string(),
        None => format!("{} probes", s.probes),
    };
    v.push(Span::raw(format!(
        "· {probes} · {} · #{}",
        fmt_duration(app.settings.interval),
        s.seq
    )));
    Line::from(v)
}

fn link_line<'a>(app: &App, t: &Theme, width: u16) -> Line<'a> {
    // `+ 0.0`: an empty sum is -0.0, which would print as "-0".
    let total = app.data().map_or(0.0, |d| d.snap.totals.dirty_bytes_per_s) + 0.0;
    let Some(bw) = app.settings.bandwidth else {
        return Line::from(vec![
            Span::styled("link ", t.label()),
            Span::raw(format!(
                "not set (b sets it) · guest dirties {}",
                fmt_rate(total)
            )),
        ]);
    };
    let share = total / bw;
    let over = share >= 1.0;
    let note = if over { " FASTER THAN THE LINK" } else { "" };
    let text = format!(
        " {:.0}% · guest dirties {}{note}",
        share * 100.0,
        fmt_rate(total)
    );
    let head = format!("link {} ", fmt_rate(bw));
    let room = (width as usize).saturating_sub(head.chars().count() + text.chars().count() + 2);
    let cells = room.clamp(10, 40);
    let filled = ((share.min(1.0) * cells as f64).round() as usize).min(cells);
    Line::from(vec![
        Span::styled(head, t.label()),
        Span::raw("["),
        Span::styled("█".repeat(filled), t.gauge(over)),
        Span::styled("░".repeat(cells - filled), t.dim()),
        Span::raw("]"),
        Span::styled(text, if over { t.bad() } else { t.plain() }),
    ])
}

/// `41.2s 5 rounds 120ms down` or `does NOT converge`.
pub fn brief(p: &Prediction) -> String {
    match p.total_s {
        Some(s) => format!(
            "{s:.1}s {} round{} {:.0}ms down",
            p.rounds,
            if p.rounds == 1 { "" } else { "s" },
            p.downtime_s.unwrap_or(0.0) * 1e3
        ),
        // Rounds are always the predictor's limit here: not worth the room.
        None => "does NOT converge".to_string(),
    }
}

fn pred_span<'a>(p: &Prediction, t: &Theme) -> Span<'a> {
    let style = if p.converges { t.plain() } else { t.bad() };
    Span::styled(brief(p), style)
}

fn prediction_line<'a>(app: &App, t: &Theme) -> Line<'a> {
    let mut v = vec![Span::styled("migration ", t.label())];
    let Some(d) = app.data().filter(|_| app.settings.bandwidth.is_some()) else {
        v.push(Span::raw("prediction needs the link bandwidth (b)"));
        return Line::from(v);
    };
    let caps = app.caps().len();
    let (without, with) = match app.policy() {
        Some(pp) => (Some(pp.without_caps), Some(pp.with_caps)),
        None => (d.uncapped.or(d.now), d.now.filter(|_| caps > 0)),
    };
    // Without caps in force there is one prediction: the migration as things are now.
    let head = if with.is_some() { "uncapped " } else { "now " };
    if let Some(p) = without {
        v.push(Span::raw(head));
        v.push(pred_span(&p, t));
    }
    match with {
        Some(p) => {
            v.push(Span::raw(" │ capped "));
            v.push(pred_span(&p, t));
        }
        None => v.push(Span::raw(" │ no caps in force")),
    }
    Line::from(v)
}

fn policy_line<'a>(app: &App, t: &Theme) -> Line<'a> {
    let s = &app.settings;
    let (word, style) = if s.auto {
        ("ON", t.cap())
    } else {
        ("off", t.plain())
    };
    let mut v = vec![
        Span::styled("auto ", t.label()),
        Span::styled(word, style),
        Span::raw(format!(
            " (a) floor {} headroom {:.0}%",
            pct(s.floor_pct),
            s.headroom * 100.0
        )),
    ];
    // The goal the policy used last (the knee), else the bound it will stay within.
    match (app.policy(), s.auto_settings()) {
        (Some(p), _) if s.auto => v.push(Span::raw(format!(" goal {:.1}s", p.target_s))),
        (_, Some(a)) if a.knee.is_some() => v.push(Span::raw(format!(
            " goal <= {:.1}s",
            a.target.as_secs_f64()
        ))),
        (_, Some(a)) => v.push(Span::raw(format!(" goal {:.1}s", a.target.as_secs_f64()))),
        _ => {}
    }
    let caps = app.caps();
    let by_policy = caps.values().filter(|c| c.by == CapBy::Policy).count();
    v.push(Span::raw(format!(
        " │ {} cap{} ({by_policy} auto)",
        caps.len(),
        if caps.len() == 1 { "" } else { "s" }
    )));
    if let Some(m) = s.mechanism {
        v.push(Span::raw(format!(" │ {m}")));
    }
    Line::from(v)
}

// --- the process table ---

#[derive(Clone, Copy, PartialEq)]
enum Col {
    Pid,
    Command,
    Dirty,
    New,
    Wp,
    Cache,
    Link,
    Cpu,
    Cap,
    Verdict,
    Meas,
    Rss,
    Cgroup,
}

impl Col {
    fn title(self) -> &'static str {
        match self {
            Col::Pid => "PID",
            Col::Command => "COMMAND",
            Col::Dirty => "DIRTY",
            Col::New => "NEW",
            Col::Wp => "WP",
            Col::Cache => "CACHE",
            Col::Link => "LINK%",
            Col::Cpu => "CPU%",
            Col::Cap => "CAP",
            Col::Verdict => "VERDICT",
            Col::Meas => "MEAS",
            Col::Rss => "RSS",
            Col::Cgroup => "CGROUP",
        }
    }

    fn sort_key(self) -> Option<SortKey> {
        Some(match self {
            Col::Pid => SortKey::Pid,
            Col::Command => SortKey::Command,
            Col::Dirty => SortKey::Dirty,
            Col::New => SortKey::New,
            Col::Wp => SortKey::WriteProtect,
            Col::Cache => SortKey::PageCache,
            Col::Cpu => SortKey::Cpu,
            Col::Cap => SortKey::Cap,
            _ => return None,
        })
    }
}

/// Columns and their widths for a table `width` wide (the command column takes the rest).
fn columns(width: u16) -> Vec<(Col, Constraint)> {
    let wide = width >= 120;
    let mut v = vec![
        (Col::Pid, Constraint::Length(7)),
        (Col::Command, Constraint::Min(8)),
        (Col::Dirty, Constraint::Length(6)),
        (Col::New, Constraint::Length(5)),
        (Col::Wp, Constraint::Length(5)),
        (Col::Cache, Constraint::Length(5)),
        (Col::Link, Constraint::Length(5)),
        (Col::Cpu, Constraint::Length(5)),
        (Col::Cap, Constraint::Length(if wide { 18 } else { 8 })),
        (Col::Verdict, Constraint::Length(7)),
        (Col::Meas, Constraint::Length(5)),
    ];
    if wide {
        v.push((Col::Rss, Constraint::Length(8)));
        v.push((Col::Cgroup, Constraint::Fill(1)));
    }
    v
}

fn table(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let rows = app.rows();
    let block = Block::new()
        .borders(Borders::TOP)
        .title(table_title(app, rows.len(), t));
    let Some(d) = app.data() else {
        f.render_widget(Paragraph::new("").block(block), area);
        return;
    };
    if rows.is_empty() {
        let why = if app.filter.is_empty() {
            "no process dirtied memory in the last interval: an idle guest migrates in one round"
                .to_string()
        } else {
            format!(
                "no process matches the filter \"{}\" (/ changes it)",
                clean(&app.filter)
            )
        };
        let p = Paragraph::new(why).block(block).wrap(Wrap { trim: true });
        f.render_widget(p, area);
        return;
    }
    let cols = columns(area.width);
    let header = Row::new(cols.iter().map(|(c, _)| {
        let style = if c.sort_key() == Some(app.sort) {
            t.sorted()
        } else {
            t.label()
        };
        Cell::from(c.title()).style(style)
    }));
    // Only the rows that fit are built (500 processes, 30 on screen).
    let sel = app.selected_index();
    let height = area.height.saturating_sub(2) as usize;
    let offset = scroll(app.offset.get(), sel, height, rows.len());
    app.offset.set(offset);
    let body = rows
        .iter()
        .skip(offset)
        .take(height)
        .map(|r| table_row(app, d, r, &cols, t));
    let widths: Vec<Constraint> = cols.iter().map(|(_, w)| *w).collect();
    let table = Table::new(body, widths)
        .header(header)
        .block(block)
        .row_highlight_style(t.selected())
        .highlight_symbol("▶")
        .highlight_spacing(HighlightSpacing::Always);
    let mut state = TableState::default().with_selected(sel.map(|i| i - offset));
    f.render_stateful_widget(table, area, &mut state);
}

/// The first row shown: it moves only when the selection would leave the screen.
fn scroll(offset: usize, sel: Option<usize>, height: usize, len: usize) -> usize {
    let max = len.saturating_sub(height);
    let offset = match sel {
        Some(s) if s < offset => s,
        Some(s) if height > 0 && s >= offset + height => s + 1 - height,
        _ => offset,
    };
    offset.min(max)
}

fn table_title<'a>(app: &App, shown: usize, t: &Theme) -> Line<'a> {
    let total = app.data().map_or(0, |d| d.rows.len());
    let arrow = if app.invert { "▲" } else { "▼" };
    let mut text = format!(
        " processes · MB/s · {shown} of {total} · sort {} {arrow} (s I) ",
        app.sort.name()
    );
    if !app.filter.is_empty() {
        text.push_str(&format!("· filter \"{}\" (/) ", clean(&app.filter)));
    }
    Line::styled(text, t.title())
}

fn table_row<'a>(
    app: &App,
    d: &Data,
    r: &DataRow,
    cols: &[(Col, Constraint)],
    t: &Theme,
) -> Row<'a> {
    let p = r.p();
    let page = d.snap.page_size as f64;
    let cap = app.caps().get(&r.id());
    let wide = cols.len() > 11;
    let cells = cols.iter().map(|(c, _)| match c {
        Col::Pid => Cell::from(format!("{:>7}", p.pid)),
        Col::Command => Cell::from(clean(&p.comm).into_owned()),
        Col::Dirty => Cell::from(right(mb(p.dirty_bytes_per_s), 6)),
        Col::New => Cell::from(right(mb(p.rates.write_new * page), 5)),
        Col::Wp => Cell::from(right(mb(p.rates.write_protect * page), 5)),
        // File pages: the page cache and shmem (tmpfs, memfd) written with write() and kin.
        Col::Cache => Cell::from(right(mb((p.rates.pagecache + p.rates.shmem) * page), 5)),
        Col::Link => Cell::from(right(
            r.r.link_share
                .map_or("-".into(), |s| format!("{:.0}", s * 100.0)),
            5,
        )),
        Col::Cpu => Cell::from(right(cpu(p.cpu_pct), 5)),
        Col::Cap => cap_cell(cap, wide, t),
        Col::Verdict => verdict_cell(r, t),
        Col::Meas => Cell::from(if p.exact { "exact" } else { "bound" }),
        Col::Rss => Cell::from(right(fmt_bytes(p.rss_bytes as f64), 8)),
        Col::Cgroup => Cell::from(clean(&p.cgroup).into_owned()),
    });
    let style = if r.gone_for > 0 {
        t.dim()
    } else {
        Style::new()
    };
    Row::new(cells.collect::<Vec<_>>()).style(style)
}

fn cap_cell<'a>(cap: Option<&CapView>, wide: bool, t: &Theme) -> Cell<'a> {
    let Some(c) = cap else {
        return Cell::from("-");
    };
    let by = if c.by == CapBy::Policy { " auto" } else { "" };
    let text = if wide {
        format!("{} {}{by}", pct(c.pct), c.mechanism)
    } else {
        format!("{}{}", pct(c.pct), if by.is_empty() { "" } else { " A" })
    };
    Cell::from(text).style(t.cap())
}

fn verdict_cell<'a>(r: &DataRow, t: &Theme) -> Cell<'a> {
    if r.gone_for > 0 {
        return Cell::from("gone").style(t.dim());
    }
    let v = r.r.verdict;
    let word = v.map_or("-".into(), |v| v.to_string());
    Cell::from(word).style(t.verdict(v))
}

/// A cap in percent of one CPU: `20%`, `12.5%`.
pub fn pct(p: f64) -> String {
    if (p - p.round()).abs() < 0.05 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

/// MB/s with 3 significant digits at most, for narrow columns.
pub fn mb(bytes_per_s: f64) -> String {
    let v = bytes_per_s / 1e6;
    if bytes_per_s <= 0.0 {
        "0".into()
    } else if v < 0.01 {
        "<.01".into()
    } else if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

fn cpu(c: f64) -> String {
    if c < 10.0 {
        format!("{c:.1}")
    } else {
        format!("{c:.0}")
    }
}

fn right(s: String, w: usize) -> String {
    format!("{s:>w$}")
}

// --- the status bar ---

const HINTS: &str = "q quit  ? help  ↑↓ select  ⏎ details  c cap  u lift  a auto  b bandwidth  s/←→ sort  I invert  / filter  f freeze  +- interval";
const HINTS_SHORT: &str =
    "q quit ? help ↑↓ select ⏎ details c cap u lift a auto b link s sort / filter";

fn status(f: &mut Frame, app: &App, t: &Theme, area: Rect) {
    let line = if let Some(p) = &app.prompt {
        let label = match p.kind {
            PromptKind::Cap => {
                let (pid, comm) = p.target.as_ref().map_or((0, ""), |(id, c)| (id.pid, c));
                format!("cap PID {pid} ({}) at % of one CPU: ", column(comm, 16))
            }
            PromptKind::Bandwidth => "link bandwidth (100Mbit, 1Gbit, 12.5MB/s): ".into(),
            PromptKind::Filter => "filter (name or PID): ".into(),
        };
        let x = area.x + (label.chars().count() + p.buf.chars().count()) as u16;
        f.set_cursor_position((x.min(area.right().saturating_sub(1)), area.y));
        Line::from(vec![
            Span::styled(label, t.label()),
            Span::raw(p.buf.clone()),
            Span::styled("   Enter apply · Esc cancel", t.dim()),
        ])
    } else if let Some(s) = app.current_status() {
        if s.error {
            Line::from(vec![
                Span::styled("error: ", t.bad()),
                Span::raw(s.text.clone()),
            ])
        } else {
            Line::from(Span::styled(s.text.clone(), t.good()))
        }
    } else {
        let hints = if area.width as usize >= HINTS.chars().count() {
            HINTS
        } else {
            HINTS_SHORT
        };
        Line::from(Span::styled(hints, t.dim()))
    };
    f.render_widget(Paragraph::new(line), area);
}
