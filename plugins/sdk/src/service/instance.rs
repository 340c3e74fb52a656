//! The `extern "C"` functions behind [`crate::export_service!`] and the
//! instance they run: its runtime, state, service, port and dispatcher.
//! Each function runs the release's code inside `catch_unwind` (through
//! [`guarded`]), so no panic unwinds into the host; all of them come on
//! the instance's home thread.

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::runtime::{Handle, Runtime};

use super::call::{CallCell, CallTask, Registry};
use super::connection::{self, Serving};
use super::port::PortLink;
use super::{AsyncPlugin, HttpService};
use crate::abi::{
    Buffer, HostApi, PluginApi, Port, PortEvent, RawRequest, RawResponse, ServiceApi, Slice,
    ABI_VERSION_SERVICE, EVENT_CONNECTION, EVENT_REQUEST, EVENT_YIELD, FEATURE_CONNECTIONS,
    FEATURE_STOP,
};
use crate::export::{can_migrate_with, free, guarded, migrate_with, panic_message};

/// What the macro knows of the release: its code, name and version.
pub trait Release {
    type Plugin: AsyncPlugin;
    const NAME: &'static str;
    const VERSION: &'static str;
}

/// Builds the table for `R`. Used by the macro only.
pub const fn service_api<R: Release>() -> ServiceApi {
    ServiceApi {
        plugin: PluginApi {
            abi_version: ABI_VERSION_SERVICE,
            size: std::mem::size_of::<ServiceApi>() as u32,
            // Connections need the runtime's I/O driver.
            features: if <R::Plugin as AsyncPlugin>::ENABLE_IO {
                FEATURE_STOP | FEATURE_CONNECTIONS
            } else {
                FEATURE_STOP
            },
            name: Slice::from_static(R::NAME),
            version: Slice::from_static(R::VERSION),
            state_version: <R::Plugin as AsyncPlugin>::STATE_VERSION,
            create: create::<R>,
            destroy: destroy::<R::Plugin>,
            handle,
            snapshot: snapshot::<R::Plugin>,
            can_migrate: can_migrate::<R::Plugin>,
            migrate: migrate::<R::Plugin>,
            health: health::<R::Plugin>,
            hook: hook::<R::Plugin>,
            free,
            stop: stop::<R::Plugin>,
        },
        attach: attach::<R::Plugin>,
    }
}

/// How many events the dispatcher takes at once.
const EVENT_BATCH: usize = 64;

/// One instance of a service release.
struct Instance<P: AsyncPlugin> {
    /// The dispatcher thread's name.
    dispatcher_name: String,
    /// What its responses are labelled with (`x-nine9s-release`).
    release: http::HeaderValue,
    port: Arc<PortLink>,
    registry: Arc<Registry>,
    /// Taken apart by `stop`.
    live: Mutex<Live<P>>,
}

struct Live<P: AsyncPlugin> {
    state: Option<Arc<P::State>>,
    /// Until `attach` hands it to the dispatcher.
    service: Option<HttpService>,
    dispatcher: Option<JoinHandle<()>>,
    runtime: Option<Runtime>,
}

impl<P: AsyncPlugin> Instance<P> {
    fn start(name: &str, version: &str, state: Option<&[u8]>) -> Result<Instance<P>, String> {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder
            .worker_threads(P::worker_threads().max(1))
            .thread_name(format!("{name}-{version}"));
        if P::ENABLE_IO {
            builder.enable_all();
        } else {
            builder.enable_time();
        }
        let runtime = builder
            .build()
            .map_err(|e| format!("cannot start the release's runtime: {e}"))?;
        let built = {
            let _inside = runtime.enter();
            P::restore(state).map(|state| {
                let state = Arc::new(state);
                (P::service(state.clone()), state)
            })
        };
        // On an error the runtime is dropped here, outside its context:
        // its threads are joined before `create` returns.
        let (service, state) = built?;
        Ok(Instance {
            dispatcher_name: format!("{name}-port"),
            release: http::HeaderValue::from_str(version)
                .map_err(|_| format!("the version {version:?} is no header value"))?,
            port: Arc::new(PortLink::new()),
            registry: Arc::new(Registry::default()),
            live: Mutex::new(Live {
                state: Some(state),
                service: Some(service),
                dispatcher: None,
                runtime: Some(runtime),
            }),
        })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live<P>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the state, inside the runtime (it may `block_on`).
    fn with_state<R>(&self, f: impl FnOnce(&P::State) -> R) -> Result<R, String> {
        let live = self.live();
        let (Some(state), Some(runtime)) = (&live.state, &live.runtime) else {
            return Err("the instance is stopped".to_owned());
        };
        let _inside = runtime.enter();
        Ok(f(state))
    }

    /// Starts the dispatcher on the port just opened.
    fn dispatch(&self) -> Result<(), String> {
        let mut live = self.live();
        let runtime = live
            .runtime
            .as_ref()
            .ok_or("the instance is stopped")?
            .handle()
            .clone();
        let service = live
            .service
            .take()
            .ok_or("the instance is attached already")?;
        let (port, registry) = (self.port.clone(), self.registry.clone());
        let release = self.release.clone();
        let dispatcher = std::thread::Builder::new()
            .name(self.dispatcher_name.clone())
            .spawn(move || dispatch(&port, &registry, &runtime, &service, release))
            .map_err(|e| format!("cannot start the release's dispatcher thread: {e}"))?;
        live.dispatcher = Some(dispatcher);
        Ok(())
    }

    /// Ends every thread of the instance: the port is closed already.
    fn stop(&self) -> Result<(), String> {
        let mut live = self.live();
        let mut failures = Vec::new();
        if let Some(dispatcher) = live.dispatcher.take() {
            if let Err(payload) = dispatcher.join() {
                failures.push(format!("the dispatcher {}", panic_message(&*payload)));
            }
        }
        for call in self.registry.all() {
            call.stop();
        }
        let (state, service) = (live.state.take(), live.service.take());
        if let Some(runtime) = live.runtime.take() {
            // The release's own drops run inside its runtime (a pool may
            // spawn its goodbyes), each caught.
            let inside = runtime.enter();
            for (what, dropped) in [
                (
                    "service",
                    catch_unwind(AssertUnwindSafe(move || drop(service))),
                ),
                ("state", catch_unwind(AssertUnwindSafe(move || drop(state)))),
            ] {
                if let Err(payload) = dropped {
                    failures.push(format!("dropping the {what} {}", panic_message(&*payload)));
                }
            }
            drop(inside);
            // Joins every worker and blocking thread, dropping the tasks
            // left (each call's task aborts it and sends `request_done`).
            // Never `shutdown_timeout`: a thread left running would run
            // unmapped code once the library is unloaded.
            drop(runtime);
        }
        self.port.close();
        match failures.is_empty() {
            true => Ok(()),
            false => Err(failures.join("; ")),
        }
    }
}

impl<P: AsyncPlugin> Drop for Instance<P> {
    /// A defence: the host stops every instance before it destroys it, and
    /// then this finds nothing left to stop.
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// The dispatcher: takes the port's events until the host closes it.
fn dispatch(
    port: &Arc<PortLink>,
    registry: &Arc<Registry>,
    runtime: &Handle,
    service: &HttpService,
    release: http::HeaderValue,
) {
    // Whatever this thread drops, it drops inside the runtime.
    let _inside = runtime.enter();
    // Told to the connections the release serves; dropped as the port
    // closes, which ends them.
    let (yielded, _) = tokio::sync::watch::channel(false);
    let serving = Serving {
        port: Arc::clone(port),
        service: service.clone(),
        release,
    };
    let mut events = [PortEvent::default(); EVENT_BATCH];
    loop {
        let n = port.wait_events(&mut events);
        if n == 0 {
            return;
        }
        for event in &events[..n] {
            if event.events & EVENT_YIELD != 0 {
                yielded.send_replace(true);
                continue;
            }
            if event.events & EVENT_CONNECTION != 0 {
                if let Some(taken) = port.take_connection(event.call) {
                    // SAFETY: just written by the host, its slices lent
                    // until `connection_done`.
                    let taken = unsafe { connection::Taken::copied(&taken) };
                    runtime.spawn(connection::serve(
                        event.call,
                        taken,
                        serving.clone(),
                        yielded.subscribe(),
                    ));
                }
                continue;
            }
            if event.events & EVENT_REQUEST != 0 {
                start_call(event.call, port, registry, runtime, service);
            }
            registry.deliver(event.call, event.events);
        }
    }
}

/// Registers a new call and spawns its task.
fn start_call(
    id: u64,
    port: &Arc<PortLink>,
    registry: &Arc<Registry>,
    runtime: &Handle,
    service: &HttpService,
) {
    let service = match catch_unwind(AssertUnwindSafe(|| service.clone())) {
        Ok(service) => service,
        Err(payload) => {
            port.abort(
                id,
                &format!("cloning the service {}", panic_message(&*payload)),
            );
            port.request_done(id);
            return;
        }
    };
    let cell = Arc::new(CallCell::new(id));
    registry.insert(cell.clone());
    runtime.spawn(CallTask::new(cell, port.clone(), registry.clone(), service));
}

/// # Safety
/// `host` is null or the agent's table, alive while the library is
/// loaded; `state` is null or a valid `Slice`; `out` and `err` are writable.
unsafe extern "C" fn create<R: Release>(
    host: *const HostApi,
    state: *const Slice,
    out: *mut *mut c_void,
    err: *mut Buffer,
) -> i32 {
    crate::host::install(host);
    guarded(err, || {
        // SAFETY: the host passes null or a valid `Slice` borrowed for this call.
        let state = unsafe { state.as_ref().map(|s| s.as_bytes()) };
        let instance = Instance::<R::Plugin>::start(R::NAME, R::VERSION, state)?;
        // SAFETY: `out` is a valid place for the instance pointer (host contract).
        unsafe { out.write(Box::into_raw(Box::new(instance)).cast()) };
        Ok(())
    })
}

/// # Safety
/// `instance` comes from `create` of this library and is destroyed once.
unsafe extern "C" fn destroy<P: AsyncPlugin>(instance: *mut c_void) {
    // A panicking Drop must not unwind into the host; the instance is gone either way.
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `instance` is the Box made by `create`, freed exactly once.
        drop(unsafe { Box::from_raw(instance.cast::<Instance<P>>()) });
    }));
}

/// # Safety
/// `instance` is live; `port` is valid until `stop` returns; `err` is writable.
unsafe extern "C" fn attach<P: AsyncPlugin>(
    instance: *const c_void,
    port: *const Port,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance of P.
        let instance = unsafe { &*instance.cast::<Instance<P>>() };
        // SAFETY: host contract: the port stays valid until `stop` returns,
        // and `stop` closes the link before it does.
        unsafe { instance.port.open(port)? };
        instance.dispatch()
    })
}

/// A service release's `handle`, which the host never calls.
///
/// # Safety
/// `err` is writable.
unsafe extern "C" fn handle(
    _instance: *const c_void,
    _request: *const RawRequest,
    _response: *mut RawResponse,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        Err("this release is a service: its requests come through its port".to_owned())
    })
}

/// # Safety
/// `instance` is live; `out` and `err` are writable.
unsafe extern "C" fn snapshot<P: AsyncPlugin>(
    instance: *const c_void,
    out: *mut Buffer,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance of P.
        let instance = unsafe { &*instance.cast::<Instance<P>>() };
        let state = instance.with_state(P::snapshot)?;
        // SAFETY: `out` is writable (host contract).
        unsafe { out.write(Buffer::from_vec(state)) };
        Ok(())
    })
}

unsafe extern "C" fn can_migrate<P: AsyncPlugin>(from: u32, to: u32) -> bool {
    can_migrate_with(P::migrations, from, to)
}

/// # Safety
/// `state` is valid for this call; `out` and `err` are writable.
unsafe extern "C" fn migrate<P: AsyncPlugin>(
    from: u32,
    to: u32,
    state: Slice,
    out: *mut Buffer,
    err: *mut Buffer,
) -> i32 {
    // SAFETY: the caller's contract, passed on.
    unsafe { migrate_with(P::migrations, from, to, state, out, err) }
}

/// # Safety
/// `instance` is live; `err` is writable.
unsafe extern "C" fn health<P: AsyncPlugin>(instance: *const c_void, err: *mut Buffer) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance of P.
        let instance = unsafe { &*instance.cast::<Instance<P>>() };
        instance.with_state(P::health)?
    })
}

/// # Safety
/// `instance` is live; `name` is valid for this call; `err` is writable.
unsafe extern "C" fn hook<P: AsyncPlugin>(
    instance: *const c_void,
    name: Slice,
    err: *mut Buffer,
) -> i32 {
    guarded(err, || {
        // SAFETY: host contract: a live instance and a name borrowed for this call.
        let (instance, name) = unsafe { (&*instance.cast::<Instance<P>>(), name.as_bytes()) };
        let name = String::from_utf8_lossy(name);
        instance.with_state(|state| P::hook(state, &name))?
    })
}

/// # Safety
/// `instance` is live, its port closed; `err` is writable.
unsafe extern "C" fn stop<P: AsyncPlugin>(instance: *const c_void, err: *mut Buffer) -> i32 {
    // SAFETY: host contract: a live instance of P.
    guarded(err, || unsafe { &*instance.cast::<Instance<P>>() }.stop())
}
