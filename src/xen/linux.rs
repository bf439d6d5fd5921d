//! Real Xen: placeholder filled in below.
