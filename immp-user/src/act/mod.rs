//! Acting on the system: the only code that moves processes between cgroups, sets CPU limits
//! or sends signals. Every change is written to the journal (and synced) before it is made;
//! undoing reads only the journal, so `immp restore` works after a SIGKILL.
pub mod cgroup;
pub mod claim;
pub mod journal;
pub mod mechanism;
pub mod signal;
pub mod target;
pub mod throttle;
pub mod undo;
