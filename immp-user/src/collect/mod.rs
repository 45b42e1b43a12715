//! Collection: what the kernel and /proc say, turned into one immutable `Snapshot` per
//! interval. Knows nothing of views or policy. The one write it makes is soft-dirty arming
//! (`sampler`), harmless to the processes.
pub mod btf;
pub mod checks;
pub mod cpu;
pub mod nonzero;
pub mod probes;
pub mod procfs;
pub mod sampler;
pub mod softdirty;
pub mod source;
