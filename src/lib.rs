pub mod sndif;
pub mod xen;
pub mod dma;
pub mod host;
pub mod backend;
pub mod sim;
