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

/// Calls `tick` after `first`, then as it asks, until it stops, a stop signal arrives or the
/// `duration` (a deadline from now, not a number of intervals) passes. At the deadline `tick`
/// runs once more (a shorter last interval), so a duration shorter than an interval still
/// measures.
pub fn run_loop(
    first: Duration,
    duration: Option<Duration>,
    mut tick: impl FnMut() -> anyhow::Result<Next>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    let deadline = duration.map(|d| start + d);
    let mut next = start + first;
    loop {
        let at_deadline = deadline.is_some_and(|d| d <= next);
        let wake = deadline.map_or(next, |d| d.min(next));
        if !sleep_until(wake) {
            return Ok(());
        }
        let wait = match tick()? {
            Next::After(w) => w,
            Next::Stop => return Ok(()),
        };
        if at_deadline {
            return Ok(());
        }
        next += wait;
        next = next.max(Instant::now());
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
            || {
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
            || {
                n += 1;
                Ok(Next::After(Duration::from_millis(150)))
            },
        )
        .unwrap();
        assert_eq!(n, 3, "150, 300, then the deadline at 400");
        assert!(t.elapsed() < Duration::from_millis(700));
    }
}
