//! A stand-in for `nine9s_sdk::service`, for the bench's bare baseline:
//! the names an async release's `src/lib.rs` uses (`AsyncPlugin`,
//! `HttpService`, `export_service!`), so that the bench compiles that very
//! file (`#[path]`, with this crate under the name `nine9s_sdk`) and serves
//! its router with plain hyper. Only what a release needs to build its
//! router is here: `restore`, `service`; `HttpService` just holds the
//! router, and `export_service!` exports nothing — the C ABI and the
//! agent's port are what the bare server leaves out.

pub mod service {
    use std::sync::Arc;

    /// `nine9s_sdk::service::AsyncPlugin`, as far as building the router
    /// goes; the rest keeps the SDK's signatures so a release's impl fits.
    pub trait AsyncPlugin: 'static {
        const STATE_VERSION: u32 = 0;
        /// The bare server's runtime has its I/O driver anyway.
        const ENABLE_IO: bool = false;
        type State: Send + Sync + 'static;
        fn restore(state: Option<&[u8]>) -> Result<Self::State, String>;
        fn service(state: Arc<Self::State>) -> HttpService;
        fn snapshot(_state: &Self::State) -> Vec<u8> {
            Vec::new()
        }
    }

    /// The router a release's `service` built, for the bare server to serve.
    pub struct HttpService(pub axum::Router);

    impl HttpService {
        pub fn new(router: axum::Router) -> HttpService {
            HttpService(router)
        }
    }
}

/// `nine9s_sdk::export_service!`: nothing to export outside a library.
#[macro_export]
macro_rules! export_service {
    ($service:ty, name = $name:expr) => {};
}
