//! `immp top`: the live screen (in progress: see the TUI issue).
use clap::Args;

pub const HELP: &str = "Examples:\n  immp top --bandwidth 100Mbit";

#[derive(Args, Debug, Clone)]
pub struct TopArgs {}

pub fn run(_a: TopArgs) -> anyhow::Result<i32> {
    Err(crate::usage("immp top is not built yet"))
}
