use std::process::ExitCode;

use clap::{Parser as _, error::ErrorKind};

fn main() -> ExitCode {
    // First of all: a stop signal from now on asks for a clean stop (caps lifted), never kills
    // immp half-way through a change.
    if let Err(e) = immp::cmd::run::install_stop_handlers() {
        eprintln!("immp: error: cannot install signal handlers: {e}");
        return ExitCode::from(immp::exit::FAILURE as u8);
    }
    let cli = match immp::cmd::Cli::try_parse() {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) =>
        {
            e.exit()
        }
        Err(e) => {
            eprintln!("immp: {}", one_line(&e));
            return ExitCode::from(immp::exit::USAGE as u8);
        }
    };
    match immp::cmd::run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            // One line: the error and its context chain.
            eprintln!("immp: error: {e:#}");
            let code = e
                .downcast_ref::<immp::ExitError>()
                .map_or(immp::exit::FAILURE, |x| x.code);
            ExitCode::from(code as u8)
        }
    }
}

/// clap's error on one line, like every other immp error (`--help` has the details). A
/// missing-argument error names the arguments, which clap puts on the following lines.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines
        .next()
        .unwrap_or("invalid arguments")
        .trim_start_matches("error: ");
    if e.kind() == ErrorKind::MissingRequiredArgument {
        let missing: Vec<&str> = lines
            .take_while(|l| l.starts_with("--") || l.starts_with('<'))
            .collect();
        return format!("{} {}", first.trim_end_matches(':'), missing.join(", "));
    }
    first.to_string()
}

/// The system allocator, zeroing what is freed. immp runs inside the guest it measures, and
/// the pages it frees (the kernel's BTF is parsed at start, tens of MB) go back to the guest's
/// free memory with their contents: a migration resends them. Zeroed, they are zero pages,
/// which QEMU sends as a few bytes each.
struct ZeroOnFree;

// SAFETY: delegates to the system allocator; zeroing writes only within the block being freed.
unsafe impl std::alloc::GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` points to `layout.size()` bytes we own until this call returns.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            std::alloc::System.dealloc(ptr, layout)
        }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }
}

#[global_allocator]
static ALLOC: ZeroOnFree = ZeroOnFree;
