pub mod sndif;
