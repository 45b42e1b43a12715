//! Stopping and the interval loop.
//!
//! Stop signals are caught from the first instruction of `main` on (before any cap exists):
//! HUP, INT, QUIT, TERM, USR1, USR2, ALRM and PIPE all only ask the running command to stop, so
//! it leaves through its normal exit path, which lifts every cap. A signal that arrives during
//! start-up is seen at the next check (`stop_requested`) and start-up ends there.
use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

/// The signals a user sends to stop a program. SIGKILL and SIGSTOP cannot be caught: for
/// SIGKILL there is the journal and `immp restore`.
pub const STOP_SIGNALS: [i32; 8] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGPIPE,
];

/// Every other signal whose default action ends a process and that a handler may catch
/// (the real-time signals too): none of them may end immp with a cap left in place.
fn other_terminating() -> Vec<i32> {
    let mut v = vec![
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGXCPU,
        libc::SIGXFSZ,
        libc::SIGPWR,
        libc::SIGIO,
        libc::SIGSTKFLT,
        libc::SIGSYS,
        libc::SIGTRAP,
    ];
    v.extend(libc::SIGRTMIN()..=libc::SIGRTMAX());
    v
}

static STOP: std::sync::OnceLock<Arc<AtomicUsize>> = std::sync::OnceLock::new();

/// Installs the stop handlers (idempotent). Call before anything changes the system.
pub fn install_stop_handlers() -> std::io::Result<()> {
    let flag = STOP.get_or_init(|| Arc::new(AtomicUsize::new(0)));
    for sig in STOP_SIGNALS.into_iter().chain(other_terminating()) {
        // SAFETY (inside signal-hook): the handler only stores into an atomic.
        if let Err(e) = signal_hook::flag::register_usize(sig, flag.clone(), sig as usize) {
            // Real-time signals the C library reserves for itself cannot be registered.
            if STOP_SIGNALS.contains(&sig) {
                return Err(e);
            }
        }
    }
    Ok(())
}

/// The stop signal received, if any.
pub fn stop_requested() -> Option<i32> {
    let s = STOP.get()?.load(Ordering::SeqCst);
    (s != 0).then_some(s as i32)
}

/// Sleeps until `until`, waking early (returns false) when a stop signal arrives.
pub fn sleep_until(until: Instant) -> bool {
    const SLICE: Duration = Duration::from_millis(20);
    loop {
        if stop_requested().is_some() {
            return false;
        }
        let now = Instant::now();
        if now >= until {
            return true;
        }
        std::thread::sleep((until - now).min(SLICE));
    }
}

/// What a tick asks of the loop.
pub enum Next {
    /// Call again after this long.
    After(Duration),
    Stop,
}

/// What the loop calls: `tick` every interval, and between ticks (every `PEEK`) `sooner`,
/// which may ask for the next tick now (`tick` is then told it is `early`).
pub trait Ticks {
    fn tick(&mut self, early: bool) -> anyhow::Result<Next>;
    fn sooner(&mut self) -> bool {
        false
    }
}

impl<F: FnMut() -> anyhow::Result<Next>> Ticks for F {
    fn tick(&mut self, _early: bool) -> anyhow::Result<Next> {
        self()
    }
}

/// How often the loop asks `Ticks::sooner` between ticks.
pub const PEEK: Duration = Duration::from_millis(250);

/// Calls `tick` after `first`, then as it asks, until it stops, a stop signal arrives or the
/// `duration` (a deadline from now, not a number of intervals) passes. At the deadline `tick`
/// runs once more (a shorter last interval), so a duration shorter than an interval still
/// measures. A tick `sooner` asks for comes at once (at most two in a row); the next is then
/// an interval after it.
pub fn run_loop(
    first: Duration,
    duration: Option<Duration>,
    t: &mut impl Ticks,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let mut next = start + first;
    // Early ticks in a row: a churn of new processes (an interpreter's start-up dirties
    // megabytes) may cost at most two extra samples per interval, and still leaves one for a
    // writer right behind it.
    let mut early_run = 0;
    loop {
        let at_deadline = deadline.is_some_and(|d| d <= next);
        let due = deadline.map_or(next, |d| d.min(next));
        let Some(early) = wait_for(due, t, early_run < 2) else {
            return Ok(());
        };
        early_run = if early { early_run + 1 } else { 0 };
        let wait = match t.tick(early)? {
            Next::After(w) => w,
            Next::Stop => return Ok(()),
        };
        if at_deadline && !early {
            return Ok(());
        }
        next = if early {
            Instant::now() + wait
        } else {
            (next + wait).max(Instant::now())
        };
    }
}

/// Sleeps until `due`, asking `sooner` every `PEEK` if `peek`: whether it asked for a tick
/// before `due`; None on a stop signal. Not within a peek of `due`: an early tick right
/// before a deadline would leave the last one a sliver.
fn wait_for(due: Instant, t: &mut impl Ticks, peek: bool) -> Option<bool> {
    loop {
        let peek_at = Instant::now() + PEEK;
        let wake = if peek && peek_at + PEEK <= due {
            peek_at
        } else {
            due
        };
        if !sleep_until(wake) {
            return None;
        }
        if wake >= due {
            return Some(false);
        }
        if t.sooner() {
            return Some(true);
        }
    }
}

/// Test hook: proves that a panic mid-run still lifts every cap (and, in `top`, restores the
/// terminal): the guards' Drop runs while the panic unwinds. Only the test suite sets
/// IMMP_TEST_PANIC_AFTER (ticks before the panic).
pub fn test_panic_hook() {
    use std::sync::atomic::AtomicU64;
    static TICKS: AtomicU64 = AtomicU64::new(0);
    let Some(n) = std::env::var("IMMP_TEST_PANIC_AFTER")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    if TICKS.fetch_add(1, Ordering::SeqCst) + 1 > n {
        panic!("IMMP_TEST_PANIC_AFTER: injected panic");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_duration_is_a_deadline_not_a_number_of_intervals() {
        let t = Instant::now();
        let mut n = 0;
        run_loop(
            Duration::from_secs(10),
            Some(Duration::from_millis(200)),
            &mut || {
                n += 1;
                Ok(Next::After(Duration::from_secs(10)))
            },
        )
        .unwrap();
        let took = t.elapsed();
        assert_eq!(n, 1, "one (short) interval at the deadline");
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_millis(600),
            "{took:?}"
        );

        let t = Instant::now();
        let mut n = 0;
        run_loop(
            Duration::from_millis(150),
            Some(Duration::from_millis(400)),
            &mut || {
                n += 1;
                Ok(Next::After(Duration::from_millis(150)))
            },
        )
        .unwrap();
        assert_eq!(n, 3, "150, 300, then the deadline at 400");
        assert!(t.elapsed() < Duration::from_millis(700));
    }

    /// Ticks every 10 s; `sooner` asks for one once, 0.5 s in.
    struct Soon {
        start: Instant,
        ticks: Vec<Duration>,
        asked: bool,
    }

    impl Ticks for Soon {
        fn tick(&mut self, _early: bool) -> anyhow::Result<Next> {
            self.ticks.push(self.start.elapsed());
            Ok(Next::After(Duration::from_secs(10)))
        }
        fn sooner(&mut self) -> bool {
            let now = !self.asked && self.start.elapsed() >= Duration::from_millis(500);
            self.asked |= now;
            now
        }
    }

    /// Asks for a tick at every peek (a churn of newcomers).
    struct Churn(Instant, Vec<Duration>);

    impl Ticks for Churn {
        fn tick(&mut self, _early: bool) -> anyhow::Result<Next> {
            self.1.push(self.0.elapsed());
            Ok(Next::After(Duration::from_secs(1)))
        }
        fn sooner(&mut self) -> bool {
            true
        }
    }

    #[test]
    fn a_churn_of_newcomers_costs_at_most_two_early_ticks_in_a_row() {
        let mut c = Churn(Instant::now(), Vec::new());
        run_loop(
            Duration::from_secs(1),
            Some(Duration::from_millis(2100)),
            &mut c,
        )
        .unwrap();
        let t = &c.1;
        // Early at ~0.25 and ~0.5 s, then a whole interval (~1.5 s), then early again.
        assert!(t.len() >= 4, "{t:?}");
        assert!(t[1] < Duration::from_millis(900), "{t:?}");
        assert!(
            t[2] - t[1] >= Duration::from_millis(950),
            "the third waits: {t:?}"
        );
    }

    #[test]
    fn a_tick_asked_for_between_intervals_comes_within_a_peek_and_does_not_end_the_run() {
        let mut s = Soon {
            start: Instant::now(),
            ticks: Vec::new(),
            asked: false,
        };
        run_loop(
            Duration::from_secs(10),
            Some(Duration::from_secs(2)),
            &mut s,
        )
        .unwrap();
        assert_eq!(
            s.ticks.len(),
            2,
            "the early one, then the deadline's: {:?}",
            s.ticks
        );
        let early = s.ticks[0];
        assert!(
            early >= Duration::from_millis(500) && early < Duration::from_millis(500) + PEEK * 2,
            "{early:?}"
        );
        assert!(s.ticks[1] >= Duration::from_secs(2), "{:?}", s.ticks);
    }
}
