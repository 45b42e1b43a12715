use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    let cli = immp::cli::Cli::parse();
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
