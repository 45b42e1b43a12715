use std::process::ExitCode;

use clap::{Parser as _, error::ErrorKind};

fn main() -> ExitCode {
    let cli = match immp::cli::Cli::try_parse() {
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
            // One line, like every other immp error; `--help` has the details.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("immp: {}", first.trim_start_matches("error: ").trim());
            return ExitCode::from(immp::exit::USAGE as u8);
        }
    };
    match immp::cli::run(cli) {
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
