//! The bottom layer: socket addresses as operators write them and the
//! socket kinds behind one type (TCP and UNIX listeners and streams), so
//! every listener kind can forward to every backend kind. It knows nothing
//! of configs, proxies or backends.

pub mod activation;
pub mod address;
pub mod exhaustion;
pub mod inherited;
pub mod pipe;
pub mod proxy_protocol;
pub mod stream;

pub use address::{Address, AddressError, TcpAddressProblem, TcpTarget};
