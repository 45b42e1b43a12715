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

/// Zeroes what is freed and gives scratch scopes back as zero pages: see `immp::alloc`.
#[global_allocator]
static ALLOC: immp::alloc::ZeroOnFree = immp::alloc::ZeroOnFree;
