//! `immp top`'s screen, in bottom's shape: collection (a thread in `cmd/top.rs`) sends whole
//! snapshots -> `state` (pure: what is shown, what keys do) -> `draw` (reads the state only,
//! on any ratatui backend: a terminal, or `TestBackend` in the tests).
//!
//! - `data`: what one snapshot shows once ranked and predicted (rows, predictions, impacts);
//! - `history`: rings of past rates and caps on one time axis;
//! - `state`: the `App`, key handling, the `Command`s that need the system;
//! - `draw`, `panes`: the header, table, history, log, status bar, help and detail;
//! - `theme`: styles (colour only repeats what a word says).
pub mod data;
pub mod draw;
pub mod history;
mod panes;
pub mod state;
#[cfg(test)]
mod tests;
pub mod theme;

pub use data::{CapBy, CapView, Settings};
pub use state::{App, Command};
