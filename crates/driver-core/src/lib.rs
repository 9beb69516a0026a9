//! The HSM driver engine (being written).
