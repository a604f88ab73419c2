//! The flex kernels: plain loops and GEMMs over host memory, each recorded as one Burn
//! operation with its own backward step where it trains.

pub(crate) mod adam;
pub(crate) mod batch_norm;
pub(crate) mod conv;
pub(crate) mod discriminator;
pub(crate) mod host;
pub(crate) mod im2col;
pub(crate) mod losses;
