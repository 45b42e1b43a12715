//! immp's userspace agent as a library: the binary (`src/main.rs`) is a thin CLI over it, and
//! the integration tests drive the same pieces. Data flows one way through the folders:
//!
//! - `collect`: kernel probes, /proc, soft-dirty, the sampler -> one immutable `Snapshot`;
//! - `model` (the `immp-model` crate): pure ranking, prediction, policy and the `Event` stream;
//! - `act`: the only code that changes the system (cgroups, signals), journaled first;
//! - `view`: renders events (table, JSON lines, CSV);
//! - `cmd`: one file per subcommand, owning its arguments, wiring the others together.
pub mod act;
pub mod alloc;
pub mod cmd;
pub mod collect;
pub mod error;
pub mod host;
pub mod pidfd;
pub mod view;

pub use error::{ExitError, environment, exit, require_root, usage};
pub use immp_model as model;
