//! Rendering tests (ratatui's TestBackend, screens kept as insta text snapshots, as gitui and
//! ratatui's own recipes do) and state tests (key sequences on a fixed stream of snapshots).
use std::{collections::BTreeMap, time::Duration};

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use immp_model::{
    Event, ProcId, Snapshot,
    event::{Capped, Mechanism, Undo, Undone, Warning},
    fixtures::{proc_, snap},
    policy::{Action, Decision},
    snapshot::{Mode, ProcSample},
};
use ratatui::{Terminal, backend::TestBackend, style::Color};

use super::{
    data::{CapBy, CapView, Settings, SortKey},
    draw::draw,
    state::{App, Command, Overlay},
};

const MB: f64 = 1e6;

fn settings() -> Settings {
    Settings {
        bandwidth: Some(12.5e6),
        ram: 96e6,
        memory: 512e6,
        goal_ram: None,
        downtime: Duration::from_millis(300),
        immp_share: 0.25,
        floor_pct: 15.0,
        headroom: 0.1,
        target: None,
        auto: false,
        interval: Duration::from_secs(1),
        mode_why: "soft-dirty windows".into(),
        mechanism: Some(Mechanism::CgroupV1),
        journal: "/var/lib/immp/journal".into(),
        keep_caps: false,
    }
}

/// A process dirtying `new`, `wp` and `cache` bytes/s at `cpu` %.
fn proc_with(pid: u32, comm: &str, new: f64, wp: f64, cache: f64, cpu: f64) -> ProcSample {
    let mut p = proc_(pid, 0.0, cpu);
    p.comm = comm.into();
    p.cmdline = format!("/usr/bin/{comm} --work");
    p.rates.write_new = new / 4096.0;
    p.rates.write_protect = wp / 4096.0;
    p.rates.pagecache = cache / 4096.0;
    p.rates.dirty = (new + wp + cache) / 4096.0;
    p.dirty_bytes_per_s = new + wp + cache;
    p.rss_bytes = 200 << 20;
    p.cgroup = "/user.slice/user-0.slice/session-1.scope".into();
    p.exact = true;
    p
}

fn guest() -> Vec<ProcSample> {
    vec![
        proc_with(4242, "ringwriter", 5.5 * MB, 0.4 * MB, 0.0, 96.0),
        proc_with(1717, "postgres", 0.2 * MB, 0.9 * MB, 0.6 * MB, 35.0),
        proc_with(900, "rsyslogd", 0.0, 0.01 * MB, 0.12 * MB, 0.4),
        proc_with(
            31337,
            "\x1b[31mevil-name-that-is-very-long",
            0.05 * MB,
            0.0,
            0.0,
            2.0,
        ),
        proc_with(77, "sshd", 0.0, 0.0, 0.0, 0.1),
    ]
}

/// A snapshot at second `t` of these processes (exact mode, totals summed).
fn at(t: u64, procs: Vec<ProcSample>, mode: Mode) -> Snapshot {
    let mut s = snap(procs);
    s.seq = t;
    s.time_unix_ms = 1_764_000_000_000 + t * 1000;
    s.mode = mode;
    s.exact_armed = if mode == Mode::Exact { 4 } else { 0 };
    s.health.capacity = 16384;
    s
}

/// A writer whose rate grows then settles, so that the history has a shape.
fn stream(app: &mut App, n: u64, mode: Mode) {
    for t in 1..=n {
        let mut procs = guest();
        let k = (t as f64 / n as f64).min(1.0);
        procs[0].dirty_bytes_per_s *= 0.3 + 0.7 * k;
        procs[1].dirty_bytes_per_s *= 1.0 + ((t % 7) as f64) / 7.0;
        let mut s = at(t, procs, mode);
        s.totals.dirty_bytes_per_s = s.processes.iter().map(|p| p.dirty_bytes_per_s).sum();
        app.on_snapshot(s);
    }
}

fn capped_view(pct: f64, by: CapBy) -> CapView {
    CapView {
        pct,
        mechanism: Mechanism::CgroupV1,
        cgroup: "/sys/fs/cgroup/cpu/user.slice/immp-4242-5242".into(),
        by,
    }
}

/// The screen most tests start from: a guest running for 40 s, the ring writer capped at 20 %.
fn busy_app() -> App {
    let mut app = App::new(settings());
    stream(&mut app, 30, Mode::Exact);
    let id = guest()[0].id();
    app.set_caps(BTreeMap::from([(id, capped_view(20.0, CapBy::Operator))]));
    let t0 = 1_764_000_030_000;
    app.info(
        t0,
        "immp top: mechanism cgroup-v1, journal /var/lib/immp/journal",
    );
    app.log_event(
        &Event::Capped(Capped {
            pid: 4242,
            start_time: id.start_time,
            comm: "ringwriter".into(),
            cap_pct: 20.0,
            mechanism: Mechanism::CgroupV1,
            cgroup: "/sys/fs/cgroup/cpu/user.slice/immp-4242-5242".into(),
        }),
        t0,
    );
    let mut capped = guest();
    capped[0].dirty_bytes_per_s = 1.2 * MB;
    capped[0].rates.write_new = 1.1 * MB / 4096.0;
    capped[0].rates.write_protect = 0.1 * MB / 4096.0;
    capped[0].cpu_pct = 20.0;
    for t in 31..=40 {
        let mut s = at(t, capped.clone(), Mode::Exact);
        s.totals.dirty_bytes_per_s = s.processes.iter().map(|p| p.dirty_bytes_per_s).sum();
        app.on_snapshot(s);
    }
    app
}

fn render(app: &App, w: u16, h: u16) -> String {
    let mut term = Terminal::new(TestBackend::new(w, h)).unwrap();
    term.draw(|f| draw(f, app)).unwrap();
    term.backend().to_string()
}

fn key(c: char) -> KeyEvent {
    KeyEvent::from(KeyCode::Char(c))
}

fn press(app: &mut App, keys: &str) -> Vec<Command> {
    keys.chars().filter_map(|c| app.on_key(key(c))).collect()
}

fn code(app: &mut App, c: KeyCode) -> Option<Command> {
    app.on_key(KeyEvent::from(c))
}

// --- rendering ---

#[test]
fn main_screen_80x24() {
    insta::assert_snapshot!(render(&busy_app(), 80, 24));
}

#[test]
fn main_screen_160x50() {
    insta::assert_snapshot!(render(&busy_app(), 160, 50));
}

#[test]
fn detail_pane() {
    let mut app = busy_app();
    let id = guest()[0].id();
    let d = Decision {
        pid: 4242,
        start_time: id.start_time,
        comm: "ringwriter".into(),
        action: Action::Keep { cap_pct: 20.0 },
        reason: "measured 1.2 MB/s under 20.0% against a budget of 2.0 MB/s: on target".into(),
        target_s: 10.0,
        budget_bytes_per_s: Some(2e6),
        measured_bytes_per_s: 1.2e6,
    };
    app.log_event(&Event::Decision(d), 1_764_000_040_000);
    press(&mut app, "j");
    assert_eq!(app.selected().unwrap().p().pid, 4242);
    code(&mut app, KeyCode::Enter);
    assert_eq!(app.overlay, Overlay::Detail);
    insta::assert_snapshot!(render(&app, 100, 30));
}

#[test]
fn help_screen() {
    let mut app = busy_app();
    press(&mut app, "?");
    insta::assert_snapshot!(render(&app, 90, 26));
}

#[test]
fn empty_guest() {
    let mut app = App::new(settings());
    app.on_snapshot(at(1, vec![], Mode::Exact));
    insta::assert_snapshot!(render(&app, 80, 24));
}

#[test]
fn guest_that_does_not_converge() {
    let mut app = App::new(settings());
    for t in 1..=5 {
        let p = proc_with(4242, "ringwriter", 20.0 * MB, 0.0, 0.0, 99.0);
        app.on_snapshot(at(
            t,
            vec![p, proc_with(5, "kworker", 0.0, 0.0, 0.1 * MB, 1.0)],
            Mode::Exact,
        ));
    }
    let screen = render(&app, 80, 24);
    assert!(screen.contains("does NOT converge"), "{screen}");
    assert!(screen.contains("FASTER THAN THE LINK"), "{screen}");
    insta::assert_snapshot!(screen);
}

#[test]
fn bounds_mode_host() {
    let mut app = App::new(Settings {
        mode_why: "no soft-dirty in this kernel".into(),
        ..settings()
    });
    let mut procs = guest();
    for p in &mut procs {
        p.exact = false;
    }
    for t in 1..=3 {
        app.on_snapshot(at(t, procs.clone(), Mode::Bounds));
    }
    let screen = render(&app, 80, 24);
    assert!(
        screen.contains("lower bound (no soft-dirty in this kernel)"),
        "{screen}"
    );
    assert!(screen.contains("bound"), "{screen}");
    insta::assert_snapshot!(screen);
}

#[test]
fn no_bandwidth_says_how_to_set_it() {
    let mut app = App::new(Settings {
        bandwidth: None,
        ..settings()
    });
    stream(&mut app, 3, Mode::Exact);
    let screen = render(&app, 80, 24);
    assert!(screen.contains("link not set (b sets it)"), "{screen}");
    assert!(
        screen.contains("prediction needs the link bandwidth (b)"),
        "{screen}"
    );
}

#[test]
fn hostile_names_reach_the_screen_cleaned() {
    let app = busy_app();
    let screen = render(&app, 160, 50);
    assert!(!screen.contains('\x1b'), "{screen}");
    assert!(screen.contains("\\x1b[31mevil"), "{screen}");
}

#[test]
fn monochrome_draws_no_colour_and_keeps_the_words() {
    let mut app = busy_app();
    app.color = false;
    let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
    term.draw(|f| draw(f, &app)).unwrap();
    let buf = term.backend().buffer();
    for c in buf.content() {
        assert!(
            matches!(c.fg, Color::Reset) && matches!(c.bg, Color::Reset),
            "{c:?}"
        );
    }
    let screen = term.backend().to_string();
    assert!(screen.contains("immp "), "the verdict is a word: {screen}");
}

#[test]
fn exited_processes_stay_greyed_for_a_few_intervals() {
    let mut app = App::new(settings());
    stream(&mut app, 3, Mode::Exact);
    let mut procs = guest();
    procs[0].gone = true;
    app.on_snapshot(at(4, procs, Mode::Exact));
    for t in 5..=7 {
        let rest: Vec<ProcSample> = guest().into_iter().skip(1).collect();
        app.on_snapshot(at(t, rest.clone(), Mode::Exact));
        let screen = render(&app, 80, 24);
        assert!(screen.contains("gone"), "interval {t}: {screen}");
    }
    app.on_snapshot(at(8, guest().into_iter().skip(1).collect(), Mode::Exact));
    assert!(
        !rows(&app).contains(&4242),
        "gone from the table after 3 more intervals"
    );
    assert!(!render(&app, 80, 24).contains("gone"));
    assert!(
        app.log()
            .iter()
            .any(|l| l.text.contains("4242 (ringwriter): exited"))
    );
}

#[test]
fn warnings_reach_the_log_once_counted() {
    let mut app = App::new(settings());
    for t in 1..=3 {
        let mut s = at(t, guest(), Mode::Exact);
        s.health.map_full = 12;
        app.on_snapshot(s);
    }
    let w: Vec<_> = app
        .log()
        .iter()
        .filter(|l| l.text.contains("table is full"))
        .collect();
    assert_eq!(w.len(), 1);
    assert_eq!(w[0].repeat, 3);
    app.log_event(
        &Event::Warning(Warning {
            message: "PID 9 not capped: refusing".into(),
        }),
        0,
    );
    assert!(render(&app, 80, 24).contains("warning: PID 9 not capped"));
}

// --- state: key sequences on a fixed stream ---

fn rows(app: &App) -> Vec<u32> {
    app.rows().iter().map(|r| r.p().pid).collect()
}

#[test]
fn select_moves_and_follows_the_process() {
    let mut app = App::new(settings());
    stream(&mut app, 2, Mode::Exact);
    assert_eq!(
        app.selected().unwrap().p().pid,
        4242,
        "the top row to start"
    );
    press(&mut app, "jj");
    assert_eq!(app.selected().unwrap().p().pid, 900);
    press(&mut app, "k");
    assert_eq!(app.selected().unwrap().p().pid, 1717);
    code(&mut app, KeyCode::Up);
    code(&mut app, KeyCode::Up);
    assert_eq!(app.selected().unwrap().p().pid, 4242, "clamped at the top");
    code(&mut app, KeyCode::End);
    assert_eq!(app.selected().unwrap().p().pid, 77);
    // The order changes (postgres overtakes): the selection stays on the same process.
    press(&mut app, "k");
    let mut procs = guest();
    procs[1].dirty_bytes_per_s = 50.0 * MB;
    app.on_snapshot(at(3, procs, Mode::Exact));
    assert_eq!(app.selected().unwrap().p().pid, 31337);
    assert_eq!(rows(&app)[0], 1717);
}

#[test]
fn sort_cycles_columns_and_inverts() {
    let mut app = App::new(settings());
    stream(&mut app, 1, Mode::Exact);
    assert_eq!(rows(&app), vec![4242, 1717, 900, 31337, 77]);
    code(&mut app, KeyCode::Right); // -> new pages
    assert_eq!(app.sort, SortKey::New);
    code(&mut app, KeyCode::Right); // -> write-protect
    assert_eq!(rows(&app)[0], 1717);
    press(&mut app, "s"); // -> page cache
    assert_eq!(app.sort, SortKey::PageCache);
    assert_eq!(rows(&app)[..2], [1717, 900]);
    for _ in 0..5 {
        code(&mut app, KeyCode::Left); // write-protect, new pages, dirty, command, PID
    }
    assert_eq!(app.sort, SortKey::Pid);
    assert_eq!(rows(&app), vec![77, 900, 1717, 4242, 31337]);
    press(&mut app, "I");
    assert_eq!(rows(&app), vec![31337, 4242, 1717, 900, 77]);
    assert!(app.current_status().unwrap().text.contains("inverted"));
}

#[test]
fn filter_by_name_or_pid_and_clear() {
    let mut app = App::new(settings());
    stream(&mut app, 1, Mode::Exact);
    press(&mut app, "/post");
    assert_eq!(rows(&app), vec![1717], "filters as one types");
    code(&mut app, KeyCode::Enter);
    assert_eq!(app.filter, "post");
    assert_eq!(app.selected().unwrap().p().pid, 1717);
    press(&mut app, "/");
    for _ in 0..4 {
        code(&mut app, KeyCode::Backspace);
    }
    press(&mut app, "90");
    code(&mut app, KeyCode::Enter);
    assert_eq!(rows(&app), vec![900], "a PID prefix");
    press(&mut app, "/");
    code(&mut app, KeyCode::Esc);
    assert!(app.filter.is_empty());
    assert_eq!(rows(&app).len(), 5);
    press(&mut app, "/zzz");
    assert!(render(&app, 80, 24).contains("no process matches the filter \"zzz\""));
}

#[test]
fn freeze_keeps_the_display_while_collection_goes_on() {
    let mut app = App::new(settings());
    stream(&mut app, 3, Mode::Exact);
    press(&mut app, "f");
    assert!(app.frozen());
    let before = app.data().unwrap().snap.seq;
    let hist = app.history().len();
    stream(&mut app, 5, Mode::Exact);
    assert_eq!(app.data().unwrap().snap.seq, before);
    assert_eq!(app.history().len(), hist);
    assert!(render(&app, 80, 24).contains("FROZEN"));
    press(&mut app, "f");
    assert_eq!(app.data().unwrap().snap.seq, 5);
    assert_eq!(app.history().len(), hist + 5);
}

#[test]
fn cap_prompt_validates_like_the_cap_option() {
    let mut app = App::new(settings());
    stream(&mut app, 2, Mode::Exact);
    assert!(press(&mut app, "cabc").is_empty());
    assert!(app.prompt.is_some());
    assert_eq!(code(&mut app, KeyCode::Enter), None);
    let s = app.current_status().unwrap();
    assert!(
        s.error && s.text.contains("'abc' is not a percentage"),
        "{s:?}"
    );
    assert!(render(&app, 80, 24).contains("error: cap PID 4242: 'abc' is not a percentage"));
    press(&mut app, "c0");
    code(&mut app, KeyCode::Enter);
    assert!(app.current_status().unwrap().text.contains("out of range"));
    // A good value asks for the cap; Esc cancels without asking.
    press(&mut app, "c");
    code(&mut app, KeyCode::Esc);
    assert!(app.prompt.is_none());
    press(&mut app, "c20%");
    let cmd = code(&mut app, KeyCode::Enter);
    let id = guest()[0].id();
    assert_eq!(
        cmd,
        Some(Command::Cap {
            id,
            comm: "ringwriter".into(),
            pct: 20.0
        })
    );
}

#[test]
fn lift_needs_a_cap_and_exempts_from_the_policy() {
    let mut app = App::new(settings());
    stream(&mut app, 2, Mode::Exact);
    assert_eq!(press(&mut app, "u"), vec![]);
    assert!(
        app.current_status()
            .unwrap()
            .text
            .contains("not capped by this immp")
    );
    let id = guest()[0].id();
    app.set_caps(BTreeMap::from([(id, capped_view(30.0, CapBy::Policy))]));
    assert_eq!(
        press(&mut app, "u"),
        vec![Command::Lift {
            id,
            comm: "ringwriter".into()
        }]
    );
    assert!(app.exempt().contains(&id));
    // The prompt of a capped process starts at its cap.
    press(&mut app, "c");
    assert_eq!(app.prompt.as_ref().unwrap().buf, "30");
}

#[test]
fn auto_needs_a_bandwidth_and_b_sets_it() {
    let mut app = App::new(Settings {
        bandwidth: None,
        ..settings()
    });
    stream(&mut app, 2, Mode::Exact);
    press(&mut app, "a");
    assert!(!app.settings.auto);
    assert!(app.current_status().unwrap().error);
    press(&mut app, "b100parsecs");
    code(&mut app, KeyCode::Enter);
    assert!(
        app.current_status()
            .unwrap()
            .text
            .contains("not a bandwidth")
    );
    press(&mut app, "b100Mbit");
    code(&mut app, KeyCode::Enter);
    assert_eq!(app.settings.bandwidth, Some(12.5e6));
    assert!(app.data().unwrap().now.is_some(), "predicted at once");
    press(&mut app, "a");
    assert!(app.settings.auto);
    press(&mut app, "a");
    assert!(!app.settings.auto);
}

#[test]
fn interval_steps_and_quit_keys() {
    let mut app = App::new(settings());
    assert_eq!(
        press(&mut app, "+"),
        vec![Command::SetInterval(Duration::from_secs(2))]
    );
    assert_eq!(
        press(&mut app, "--"),
        vec![
            Command::SetInterval(Duration::from_secs(1)),
            Command::SetInterval(Duration::from_millis(500))
        ]
    );
    press(&mut app, "?");
    assert_eq!(app.overlay, Overlay::Help);
    press(&mut app, "q");
    assert!(!app.quit, "q closes the help first");
    code(&mut app, KeyCode::Esc);
    assert!(app.quit);
    let mut app = App::new(settings());
    app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
    assert!(app.quit, "Ctrl-C (raw mode makes it a key)");
}

#[test]
fn lifted_and_decisions_are_logged_and_kept_for_the_detail() {
    let mut app = busy_app();
    let id: ProcId = guest()[0].id();
    app.log_event(
        &Event::Lifted(Undo {
            pid: 4242,
            start_time: id.start_time,
            comm: "ringwriter".into(),
            undone: Undone::MovedBack {
                moved: 1,
                to: "/user.slice".into(),
            },
        }),
        1_764_000_041_000,
    );
    let last = app.log().back().unwrap().clone();
    assert!(
        last.text.contains("cap lifted, moved back to /user.slice"),
        "{last:?}"
    );
    let d = Decision {
        pid: 4242,
        start_time: id.start_time,
        comm: "ringwriter".into(),
        action: Action::Keep { cap_pct: 20.0 },
        reason: "on target".into(),
        target_s: 10.0,
        budget_bytes_per_s: None,
        measured_bytes_per_s: 0.0,
    };
    app.log_event(&Event::Decision(d), 0);
    assert_eq!(
        app.log().back().unwrap().text,
        last.text.clone(),
        "keep: not logged"
    );
    assert_eq!(app.decisions(&id).count(), 1, "but kept for the detail");
}

#[test]
fn the_selected_process_impact_is_the_one_assess_computes() {
    use immp_model::impact::assess;
    let mut app = App::new(settings());
    for t in 1..=3 {
        let p = proc_with(4242, "ringwriter", 20.0 * MB, 0.0, 0.0, 99.0);
        let q = proc_with(5, "kworker", 0.0, 0.0, 0.3 * MB, 1.0);
        app.on_snapshot(at(t, vec![p, q], Mode::Exact));
    }
    assert!(
        app.data().unwrap().impact.is_none(),
        "not computed while not shown"
    );
    code(&mut app, KeyCode::Enter);
    let (id, mine) = app.data().unwrap().impact.unwrap();
    assert_eq!(id.pid, 4242);
    let last = at(
        3,
        vec![
            proc_with(4242, "ringwriter", 20.0 * MB, 0.0, 0.0, 99.0),
            proc_with(5, "kworker", 0.0, 0.0, 0.3 * MB, 1.0),
        ],
        Mode::Exact,
    );
    let theirs = assess(&last, &settings().link().unwrap(), None, 2).impacts[&id];
    assert_eq!(mine, theirs);
    assert!(mine.cap_to_converge.is_some());
    assert!(render(&app, 100, 30).contains("cap to converge"));
    press(&mut app, "j");
    assert_eq!(
        app.data().unwrap().impact.unwrap().0.pid,
        5,
        "follows the selection"
    );
}

#[test]
fn the_table_scrolls_to_keep_the_selection_on_screen() {
    let mut app = App::new(settings());
    let procs: Vec<ProcSample> = (1..=60)
        .map(|i| proc_with(1000 + i, "w", (100 - i) as f64 * 0.1 * MB, 0.0, 0.0, 1.0))
        .collect();
    app.on_snapshot(at(1, procs, Mode::Exact));
    code(&mut app, KeyCode::End);
    let screen = render(&app, 80, 24);
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("\"▶") && l.contains("1060")),
        "{screen}"
    );
    code(&mut app, KeyCode::Home);
    let screen = render(&app, 80, 24);
    assert!(
        screen
            .lines()
            .any(|l| l.starts_with("\"▶") && l.contains("1001")),
        "{screen}"
    );
}

#[test]
fn any_terminal_size_draws_without_panicking() {
    let mut app = busy_app();
    for (w, h) in [(1, 1), (10, 3), (20, 5), (40, 12), (79, 23), (300, 100)] {
        render(&app, w, h);
        code(&mut app, KeyCode::Enter);
        render(&app, w, h);
        code(&mut app, KeyCode::Enter);
        press(&mut app, "?");
        render(&app, w, h);
        press(&mut app, "?");
    }
}
