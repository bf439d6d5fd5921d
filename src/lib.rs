pub mod backend;
pub mod dma;
pub mod host;
pub mod sim;
pub mod sndif;
pub mod xen;
