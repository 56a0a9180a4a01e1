//! Fuzz targets of the DPS workspace (see `targets`).
pub mod targets;
