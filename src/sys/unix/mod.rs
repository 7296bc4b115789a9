//! Linux implementation of the system layer.

pub mod clock;
pub mod comm;
pub mod eventfd;
pub mod fd;
pub mod fork;
pub mod futex;
pub mod memfile;
pub mod shm;
pub mod sock;
pub mod spawn;
pub mod stream;
pub mod wait;
