//! immp's pure core, shared by every command and view: the `Snapshot` that collection produces,
//! ranking and verdicts, the pre-copy predictor, each writer's impact, the automatic cap policy,
//! and the typed `Event` stream every command emits and every view renders.
//!
//! Nothing here touches the system, parses arguments or knows exit codes: it is tested with
//! fixed snapshots, no kernel needed (as gitui keeps its git logic in asyncgit).
pub mod event;
#[cfg(any(test, feature = "fixtures"))]
pub mod fixtures;
pub mod impact;
pub mod migration;
pub mod policy;
pub mod predict;
pub mod rank;
pub mod snapshot;
pub mod text;
pub mod units;

pub use event::Event;
pub use snapshot::{ProcId, Snapshot};
