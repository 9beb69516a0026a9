//! Support code for the end-to-end tests (being written).
