//! The host side: what runs next to QEMU, not in the guest. `immp host watch` follows a VM's
//! migration over QMP and drives immp inside the guest through qemu-guest-agent; nothing here
//! loads eBPF or touches cgroups (the guest's immp does that), and nothing opens a network
//! port into the guest.
pub mod qga;
pub mod qmp;
pub mod watch;
pub mod wire;
