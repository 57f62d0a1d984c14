pub mod limits;
pub mod protocol;
