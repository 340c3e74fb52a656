//! [`Library`]: one opened plugin library; [`Instance`]: one running
//! instance of its plugin. A library speaks ABI version 2 or 1 (frozen,
//! `nine9s_sdk::abi::v1`), answering each request through `handle`, or 3:
//! a service, which takes requests through its instance's [`Port`] and
//! whose instance calls all run on its home thread (`home`), and its
//! migrations on a thread of their own: a service's code never runs on a
//! thread of the agent's that lives on. All three are loaded, and the
//! difference stays in this file.

use std::ffi::c_void;
use std::mem::size_of;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use parking_lot::Mutex;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::HeaderMap;
use libloading::os::unix::{Library as DlLibrary, RTLD_LOCAL, RTLD_NOW};
use nine9s_sdk::abi::{
    decode_headers, v1, Buffer, Header, PluginApi, RawRequest, RawResponse, ServiceApi, Slice,
    ABI_VERSION, ABI_VERSION_SERVICE, ABI_VERSION_SYMBOL, API_SYMBOL, FEATURE_CONNECTIONS,
    FEATURE_STOP, STATUS_ERROR, STATUS_OK, STATUS_PANIC, TEXT_PLAIN_BLOCK,
};

use crate::home::Home;
use crate::host_table::host_table;
use crate::maps::{forget_released, is_mapped, note_released_but_mapped};
use crate::port::{Call, Closed, Port, RequestHead};
use crate::{CallError, LoadError};

/// The ABI versions this host loads.
pub const ABI_VERSIONS: [u32; 3] = [v1::ABI_VERSION, ABI_VERSION, ABI_VERSION_SERVICE];

/// Request headers passed on the stack; a request with more takes one
/// allocation.
const STACK_HEADERS: usize = 32;

/// A request for a plugin, borrowed for one call.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The path, without the query string.
    pub path: &'a str,
    /// The query string, without the `?`.
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

/// A plugin's response. The body is the plugin's own buffer, handed on
/// without a copy (it keeps the library loaded until it is dropped).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A library's table, of the ABI version it speaks.
#[derive(Clone, Copy)]
enum Table {
    V1(NonNull<v1::PluginApi>),
    V2(NonNull<PluginApi>),
    /// A service: the v2 table, then `attach`.
    V3(NonNull<ServiceApi>),
}

/// The entries versions 1 and 2 have alike, read once from either table:
/// only `create`, `handle` and `stop` need to know the version.
#[derive(Clone, Copy)]
struct Shared {
    destroy: unsafe extern "C" fn(instance: *mut c_void),
    snapshot: unsafe extern "C" fn(*const c_void, *mut Buffer, *mut Buffer) -> i32,
    can_migrate: unsafe extern "C" fn(from: u32, to: u32) -> bool,
    migrate: unsafe extern "C" fn(u32, u32, Slice, *mut Buffer, *mut Buffer) -> i32,
    health: unsafe extern "C" fn(*const c_void, *mut Buffer) -> i32,
    hook: unsafe extern "C" fn(*const c_void, Slice, *mut Buffer) -> i32,
    free: unsafe extern "C" fn(buffer: Buffer),
}

/// [`Shared`] out of a table of either version (same field names).
macro_rules! shared {
    ($table:expr) => {
        Shared {
            destroy: $table.destroy,
            snapshot: $table.snapshot,
            can_migrate: $table.can_migrate,
            migrate: $table.migrate,
            health: $table.health,
            hook: $table.hook,
            free: $table.free,
        }
    };
}

/// How many `Library` values have each path open. `dlopen` of a path that
/// is already open returns the same handle, so a path is expected to stay
/// mapped until the last of them is closed.
static OPEN: Mutex<Vec<(PathBuf, usize)>> = Mutex::new(Vec::new());

/// An opened plugin library whose ABI has been checked.
pub struct Library {
    path: PathBuf,
    name: String,
    version: String,
    state_version: u32,
    abi_version: u32,
    /// Points into the library's static data; valid while `dl` is open.
    /// `None` only before `check_abi` succeeded.
    table: Option<Table>,
    /// The entries both versions have; with `table`.
    shared: Option<Shared>,
    dl: Option<DlLibrary>,
}

// SAFETY: `table` points to an immutable `'static` table inside the library
// (the SDK builds it in a `static`), and every function in it may be called
// from any thread: the SDK requires `Plugin: Send + Sync`.
unsafe impl Send for Library {}
// SAFETY: as above; `Library` has no interior mutability.
unsafe impl Sync for Library {}

impl std::fmt::Debug for Library {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Library")
            .field("path", &self.path)
            .field("name", &self.name)
            .field("version", &self.version)
            .finish()
    }
}

impl Library {
    /// Opens the library at `path` (which must be unique to its contents:
    /// `dlopen` of a path already open returns the code loaded first) and
    /// checks that it is a nine9s plugin of this ABI version.
    pub fn open(path: &Path) -> Result<Arc<Library>, LoadError> {
        let path = path.canonicalize().map_err(|e| LoadError::NotALibrary {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // SAFETY: opening runs the library's ELF initialisers. The caller
        // hands us a library staged as a nine9s release; a Rust cdylib built
        // with the SDK has no initialisers that assume anything of the host.
        let dl = unsafe { DlLibrary::open(Some(&path), RTLD_NOW | RTLD_LOCAL) }.map_err(|e| {
            LoadError::NotALibrary {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        Library::checked(path, dl)
    }

    /// Opens the library read from `file` through its descriptor, so the
    /// code loaded is that of the file opened (and hashed) whatever has
    /// been renamed over its path since, and checks it as [`Library::open`]
    /// does. It is named by the path the descriptor resolves to, the one
    /// `/proc/self/maps` shows for it.
    pub fn open_file(file: OwnedFd) -> Result<Arc<Library>, LoadError> {
        let path =
            std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).map_err(|e| {
                LoadError::NotALibrary {
                    path: PathBuf::from(format!("descriptor {}", file.as_raw_fd())),
                    reason: e.to_string(),
                }
            })?;
        // A file unlinked (or renamed over) since it was opened reads back
        // with this suffix; /proc/self/maps shows it after the path too.
        let path = match path.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(original) => PathBuf::from(original),
            None => path,
        };
        let dl = crate::descriptor::open(file).map_err(|reason| LoadError::NotALibrary {
            path: path.clone(),
            reason,
        })?;
        Library::checked(path, dl)
    }

    /// Counts `dl` as open on `path` and checks its ABI.
    fn checked(path: PathBuf, dl: DlLibrary) -> Result<Arc<Library>, LoadError> {
        register_open(&path);
        // From here on, dropping `library` closes the handle.
        let mut library = Library {
            path,
            name: String::new(),
            version: String::new(),
            state_version: 0,
            abi_version: 0,
            table: None,
            shared: None,
            dl: Some(dl),
        };
        library.check_abi()?;
        Ok(Arc::new(library))
    }

    fn check_abi(&mut self) -> Result<(), LoadError> {
        let dl = self.dl.as_ref().expect("open until dropped");
        let missing = |symbol| LoadError::MissingSymbol {
            path: self.path.clone(),
            symbol,
        };
        // SAFETY: the SDK exports this symbol as a `static u32`; reading the
        // symbol's address as `*const u32` runs no code.
        let found = unsafe {
            let symbol = dl
                .get::<*const u32>(ABI_VERSION_SYMBOL)
                .map_err(|_| missing(ABI_VERSION_SYMBOL))?;
            let address: *const u32 = *symbol;
            if address.is_null() {
                return Err(missing(ABI_VERSION_SYMBOL));
            }
            address.read_unaligned()
        };
        if !ABI_VERSIONS.contains(&found) {
            return Err(LoadError::AbiMismatch {
                path: self.path.clone(),
                found,
                expected: ABI_VERSIONS.to_vec(),
            });
        }
        // SAFETY: a library of ABI version 1, 2 or 3 exports this symbol as
        // `extern "C" fn() -> *const` its table (the SDK's macro), which
        // only returns the address of a static and cannot unwind.
        let table = unsafe {
            let entry = dl
                .get::<extern "C" fn() -> *const c_void>(API_SYMBOL)
                .map_err(|_| missing(API_SYMBOL))?;
            entry()
        };
        let bad = |reason: String| LoadError::BadTable {
            path: self.path.clone(),
            reason,
        };
        let table = NonNull::new(table.cast_mut()).ok_or_else(|| bad("null table".into()))?;
        // Both tables begin with `abi_version: u32`, then differ.
        // SAFETY: non-null and pointing at the SDK's `'static` table, valid
        // while `dl` is open; its first field is a u32 in either version.
        let in_table = unsafe { table.cast::<u32>().read() };
        if in_table != found {
            return Err(bad(format!(
                "the table says ABI version {in_table}, the symbol {found}"
            )));
        }
        let (table, shared, name, version, state_version) = if found == v1::ABI_VERSION {
            let table = table.cast::<v1::PluginApi>();
            // SAFETY: a v1 table (checked above), valid while `dl` is open;
            // the SDK fills name and version from `'static` literals.
            let (t, name, version) = unsafe {
                let t = table.as_ref();
                (t, t.name.as_bytes(), t.version.as_bytes())
            };
            (Table::V1(table), shared!(t), name, version, t.state_version)
        } else if found == ABI_VERSION_SERVICE {
            let table = table.cast::<ServiceApi>();
            // SAFETY: a v3 table begins as a v2 one, with its size.
            let size = unsafe { table.cast::<u32>().add(1).read() } as usize;
            if size < size_of::<ServiceApi>() {
                return Err(bad(format!(
                    "a version 3 table of {size} bytes is shorter than the {} this agent reads",
                    size_of::<ServiceApi>()
                )));
            }
            // SAFETY: a v3 table as long as `ServiceApi` at least, valid
            // while `dl` is open; name and version are `'static`.
            let (t, name, version) = unsafe {
                let t = &table.as_ref().plugin;
                (t, t.name.as_bytes(), t.version.as_bytes())
            };
            if t.features & FEATURE_STOP == 0 {
                return Err(bad(
                    "a version 3 table must have stop (FEATURE_STOP): a service's threads are joined before it is unloaded".into(),
                ));
            }
            (Table::V3(table), shared!(t), name, version, t.state_version)
        } else {
            let table = table.cast::<PluginApi>();
            // SAFETY: a v2 table begins with its size: read it before
            // trusting the rest to be there.
            let size = unsafe { table.cast::<u32>().add(1).read() } as usize;
            // Every entry this host knows must be there: a reference to the
            // whole struct over a shorter table would read past its end.
            // (Entries added after these will be read through the raw
            // pointer, each after its own size check.)
            if size < size_of::<PluginApi>() {
                return Err(bad(format!(
                    "a version 2 table of {size} bytes is shorter than the {} this agent reads",
                    size_of::<PluginApi>()
                )));
            }
            // SAFETY: a v2 table as long as `PluginApi` at least, valid
            // while `dl` is open; name and version are `'static`.
            let (t, name, version) = unsafe {
                let t = table.as_ref();
                (t, t.name.as_bytes(), t.version.as_bytes())
            };
            (Table::V2(table), shared!(t), name, version, t.state_version)
        };
        self.name =
            String::from_utf8(name.to_vec()).map_err(|_| bad("name is not UTF-8".into()))?;
        self.version =
            String::from_utf8(version.to_vec()).map_err(|_| bad("version is not UTF-8".into()))?;
        self.state_version = state_version;
        self.abi_version = found;
        self.table = Some(table);
        self.shared = Some(shared);
        Ok(())
    }

    fn shared(&self) -> &Shared {
        self.shared.as_ref().expect("checked in open")
    }

    fn table(&self) -> Table {
        self.table.expect("checked in open")
    }

    /// The v2 table (a service's begins with one), or `None` for a v1
    /// library.
    fn v2(&self) -> Option<&PluginApi> {
        match self.table() {
            // SAFETY: checked in `check_abi`; static data of the library,
            // which stays open as long as `self` lives.
            Table::V2(t) => Some(unsafe { t.as_ref() }),
            // SAFETY: as above.
            Table::V3(t) => Some(unsafe { &t.as_ref().plugin }),
            Table::V1(_) => None,
        }
    }

    /// The service table, for a library of ABI version 3.
    fn v3(&self) -> Option<&ServiceApi> {
        match self.table() {
            // SAFETY: checked in `check_abi`; static data of the library,
            // which stays open as long as `self` lives.
            Table::V3(t) => Some(unsafe { t.as_ref() }),
            Table::V1(_) | Table::V2(_) => None,
        }
    }

    /// Whether the release serves as a service (ABI version 3): requests
    /// go to its instances' ports, never through `handle`.
    pub fn is_service(&self) -> bool {
        self.v3().is_some()
    }

    /// Whether the release serves the HTTP/1.1 connections handed to it
    /// itself (a service with `FEATURE_CONNECTIONS`).
    pub fn serves_connections(&self) -> bool {
        self.v3()
            .is_some_and(|t| t.plugin.features & FEATURE_CONNECTIONS != 0)
    }

    fn v1(&self) -> Option<&v1::PluginApi> {
        match self.table() {
            // SAFETY: as in `v2`.
            Table::V1(t) => Some(unsafe { t.as_ref() }),
            Table::V2(_) | Table::V3(_) => None,
        }
    }

    /// Where the library is mapped from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The plugin's name, as compiled in.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The plugin's version, as compiled in.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The plugin ABI version the library speaks.
    pub fn abi_version(&self) -> u32 {
        self.abi_version
    }

    /// The state version this code snapshots and restores; 0 for none.
    pub fn state_version(&self) -> u32 {
        self.state_version
    }

    /// Whether this library knows a chain of migrations between two state versions.
    pub fn can_migrate(&self, from: u32, to: u32) -> bool {
        let can_migrate = self.shared().can_migrate;
        self.off_thread(|| {
            // SAFETY: an SDK export; it catches panics and touches no caller memory.
            unsafe { can_migrate(from, to) }
        })
    }

    /// Migrates a state snapshot from one state version to another.
    pub fn migrate(&self, from: u32, to: u32, state: &[u8]) -> Result<Vec<u8>, CallError> {
        let migrate = self.shared().migrate;
        self.off_thread(|| {
            let mut out = Buffer::EMPTY;
            let mut err = Buffer::EMPTY;
            // SAFETY: `state` is borrowed for the call; `out` and `err` are writable.
            let status = unsafe { migrate(from, to, Slice::new(state), &mut out, &mut err) };
            self.finish(status, err)?;
            Ok(self.take(out))
        })
    }

    /// Runs `f`, code of the library's own that belongs to no instance:
    /// for a service, on a thread of its own joined before this returns,
    /// as its instances' calls run on their home thread (`home.rs`) — the
    /// code may leave thread-local destructors on the thread it runs on,
    /// and glibc keeps the library mapped while that thread lives: on the
    /// caller's (an agent thread that lives on), for good.
    fn off_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        if !self.is_service() {
            return f();
        }
        // Taken back if no thread can be had: run here rather than not at all.
        let job = Mutex::new(Some(f));
        let run = || job.lock().take().map(|f| f());
        std::thread::scope(|scope| {
            let ran = std::thread::Builder::new()
                .name("n9s-migrate".into())
                .spawn_scoped(scope, run)
                .ok()
                .and_then(|thread| {
                    thread
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                });
            ran.or_else(run).expect("the job runs once")
        })
    }

    /// Starts an instance, from a snapshot of [`Self::state_version`] or fresh.
    pub fn instantiate(self: &Arc<Self>, state: Option<&[u8]>) -> Result<Instance, CallError> {
        if self.is_service() {
            return self.instantiate_service(state);
        }
        let slice = state.map(Slice::new);
        let state_ptr = slice
            .as_ref()
            .map_or(std::ptr::null(), |s| s as *const Slice);
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut err = Buffer::EMPTY;
        // SAFETY: `state_ptr` is null or points to a slice borrowed for the
        // call; `out` and `err` are writable; the host table lives for the
        // whole process.
        let status = unsafe {
            match (self.v1(), self.v2()) {
                (Some(t), _) => (t.create)(state_ptr, &mut out, &mut err),
                (_, Some(t)) => {
                    (t.create)(host_table(&self.version), state_ptr, &mut out, &mut err)
                }
                _ => unreachable!("a library has one table"),
            }
        };
        self.finish(status, err)?;
        let ptr = NonNull::new(out)
            .ok_or_else(|| CallError::Failed("plugin created a null instance".into()))?;
        Ok(Instance {
            library: Arc::clone(self),
            ptr,
            service: None,
        })
    }

    /// A service's instance: its home thread started, `create` and
    /// `attach` run there, its port open.
    fn instantiate_service(self: &Arc<Self>, state: Option<&[u8]>) -> Result<Instance, CallError> {
        let home = Home::start(&self.version)
            .map_err(|e| CallError::Failed(format!("cannot start the instance's thread: {e}")))?;
        let mut service = Service {
            home,
            port: Port::new(self.serves_connections()),
        };
        let state = state.map(<[u8]>::to_vec);
        let library = Arc::clone(self);
        let created = service.home.run(move || -> Result<Instance, CallError> {
            let slice = state.as_deref().map(Slice::new);
            let state_ptr = slice
                .as_ref()
                .map_or(std::ptr::null(), |s| s as *const Slice);
            let table = library.v2().expect("a service has a v2 table");
            let mut out: *mut c_void = std::ptr::null_mut();
            let mut err = Buffer::EMPTY;
            // SAFETY: as for v2 in `instantiate`, on the home thread.
            let status = unsafe {
                (table.create)(host_table(&library.version), state_ptr, &mut out, &mut err)
            };
            library.finish(status, err)?;
            let ptr = NonNull::new(out)
                .ok_or_else(|| CallError::Failed("plugin created a null instance".into()))?;
            Ok(Instance {
                library: Arc::clone(&library),
                ptr,
                service: None,
            })
        });
        let mut instance = match created.and_then(|made| made) {
            Ok(instance) => instance,
            Err(e) => {
                service.home.end();
                return Err(e);
            }
        };
        instance.service = Some(service);
        let attach = self.v3().expect("a service").attach;
        let port = SendPtr(
            instance
                .service
                .as_ref()
                .expect("set")
                .port
                .raw()
                .cast_mut()
                .cast(),
        );
        // Dropped on failure: stopped and destroyed on its home thread.
        instance.on_home(move |library, ptr| {
            let port = port;
            let mut err = Buffer::EMPTY;
            // SAFETY: a live instance; the port outlives its `stop` (the
            // instance holds it, and closes it only before `stop`).
            let status = unsafe { attach(ptr, port.0.cast_const().cast(), &mut err) };
            library.finish(status, err)
        })??;
        Ok(instance)
    }

    /// Turns a status into a result, freeing the error buffer.
    fn finish(&self, status: i32, err: Buffer) -> Result<(), CallError> {
        match status {
            STATUS_OK => Ok(()),
            STATUS_ERROR => Err(CallError::Failed(self.take_string(err))),
            STATUS_PANIC => Err(CallError::Panicked(self.take_string(err))),
            other => Err(CallError::BadStatus(other)),
        }
    }

    /// Gives a buffer back to the plugin that allocated it (a lent one,
    /// of capacity 0, was never allocated: nothing to give back).
    fn free(&self, buffer: Buffer) {
        if buffer.ptr.is_null() || buffer.cap == 0 {
            return;
        }
        let free = self.shared().free;
        // SAFETY: the buffer came from this library's allocator; freed once, here.
        unsafe { free(buffer) };
    }

    /// Copies a plugin buffer and gives it back to the plugin.
    fn take(&self, buffer: Buffer) -> Vec<u8> {
        // SAFETY: the buffer was filled by this library and is not freed yet.
        let bytes = unsafe { buffer.as_bytes() }.to_vec();
        self.free(buffer);
        bytes
    }

    fn take_string(&self, buffer: Buffer) -> String {
        String::from_utf8_lossy(&self.take(buffer)).into_owned()
    }
}

/// Bodies up to this size are copied out of the plugin; larger ones are
/// sent from its buffer.
const COPIED_BODY: usize = 16 * 1024;

/// The headers of a v2 response block. `content-type: text/plain` alone
/// (the SDK's constant block) needs no parsing.
pub(crate) fn response_headers(block: &[u8]) -> Result<HeaderMap, CallError> {
    let mut headers = HeaderMap::new();
    if block == TEXT_PLAIN_BLOCK {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        return Ok(headers);
    }
    let mut invalid = None;
    let whole = decode_headers(block, |name, value| {
        match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            (Ok(name), Ok(value)) => {
                headers.append(name, value);
            }
            _ => {
                invalid.get_or_insert_with(|| String::from_utf8_lossy(name).into_owned());
            }
        }
    });
    if !whole {
        return Err(CallError::Failed(
            "the response's header block is malformed".into(),
        ));
    }
    if let Some(name) = invalid {
        return Err(CallError::Failed(format!(
            "the response has an invalid header {name:?} (a name must be a token, a value visible ASCII or obs-text)"
        )));
    }
    Ok(headers)
}

/// A buffer of a plugin's, owned by a `Bytes` until it is dropped: then
/// it goes back to the plugin, whose library it keeps loaded meanwhile.
struct PluginBytes {
    library: Arc<Library>,
    buffer: Buffer,
}

// SAFETY: the buffer is owned by this value alone, and the plugin's
// `free` may be called from any thread (it is Rust's global allocator).
unsafe impl Send for PluginBytes {}

impl AsRef<[u8]> for PluginBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: filled by the plugin and freed only in `drop`.
        unsafe { self.buffer.as_bytes() }
    }
}

impl Drop for PluginBytes {
    fn drop(&mut self) {
        let buffer = std::mem::replace(&mut self.buffer, Buffer::EMPTY);
        self.library.free(buffer);
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        let Some(dl) = self.dl.take() else { return };
        if let Err(e) = dl.close() {
            tracing::warn!(path = %self.path.display(), error = %e, "dlclose failed");
        }
        if unregister_open(&self.path) == 0 {
            if is_mapped(&self.path) {
                tracing::warn!(
                    path = %self.path.display(),
                    version = %self.version,
                    "library released but still mapped: it registered thread-local destructors, \
                     so glibc will not unmap it"
                );
                note_released_but_mapped(self.path.clone());
            } else {
                tracing::debug!(path = %self.path.display(), version = %self.version, "library unloaded");
            }
        }
    }
}

fn register_open(path: &Path) {
    let mut open = OPEN.lock();
    match open.iter_mut().find(|(p, _)| p == path) {
        Some((_, count)) => *count += 1,
        None => open.push((path.to_owned(), 1)),
    }
    forget_released(path);
}

/// Returns how many handles on `path` remain open.
fn unregister_open(path: &Path) -> usize {
    let mut open = OPEN.lock();
    let Some(index) = open.iter().position(|(p, _)| p == path) else {
        return 0;
    };
    open[index].1 -= 1;
    let left = open[index].1;
    if left == 0 {
        open.swap_remove(index);
    }
    left
}

/// A running instance of a plugin. Calls may come from any thread at once.
pub struct Instance {
    library: Arc<Library>,
    ptr: NonNull<c_void>,
    /// A service's home thread and port.
    service: Option<Service>,
}

struct Service {
    home: Home,
    port: Arc<Port>,
}

/// A pointer moved to the home thread, which uses it while its sender
/// waits for the call to end.
struct SendPtr(*mut c_void);

// SAFETY: the pointer is used only during a call the sending thread waits
// for, and the instance it points to is `Send + Sync` (see `Instance`).
unsafe impl Send for SendPtr {}

// SAFETY: the instance is a `Box<P>` with `P: Plugin: Send + Sync` (the SDK
// requires it), only ever used through the plugin's `&self` methods.
unsafe impl Send for Instance {}
// SAFETY: as above.
unsafe impl Sync for Instance {}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("library", &self.library)
            .finish()
    }
}

impl Instance {
    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    /// Answers one request.
    pub fn handle(&self, request: &Request<'_>) -> Result<Response, CallError> {
        if self.service.is_some() {
            return Err(CallError::Failed(
                "a service takes requests through its port, not handle".into(),
            ));
        }
        match (self.library.v1(), self.library.v2()) {
            (Some(t), _) => self.handle_v1(t, request),
            (_, Some(t)) => self.handle_v2(t, request),
            _ => unreachable!("a library has one table"),
        }
    }

    fn handle_v2(&self, table: &PluginApi, request: &Request<'_>) -> Result<Response, CallError> {
        // The headers as the plugin reads them, on the stack unless there
        // are many.
        let mut on_stack = [Header::EMPTY; STACK_HEADERS];
        let mut on_heap = Vec::new();
        let count = request.headers.len();
        let headers: &mut [Header] = if count <= STACK_HEADERS {
            &mut on_stack[..count]
        } else {
            on_heap.resize(count, Header::EMPTY);
            &mut on_heap
        };
        for (slot, (name, value)) in headers.iter_mut().zip(request.headers) {
            *slot = Header {
                name: Slice::new(name.as_str().as_bytes()),
                value: Slice::new(value.as_bytes()),
            };
        }
        let raw = RawRequest {
            method: Slice::new(request.method.as_bytes()),
            path: Slice::new(request.path.as_bytes()),
            query: Slice::new(request.query.as_bytes()),
            headers: headers.as_ptr(),
            header_count: headers.len(),
            body: Slice::new(request.body),
        };
        let mut response = RawResponse {
            status: 0,
            headers: Buffer::EMPTY,
            body: Buffer::EMPTY,
        };
        let mut err = Buffer::EMPTY;
        let lib = &self.library;
        // SAFETY: `ptr` is a live instance of this library; `raw` and the
        // header array borrow `request` for the call; `response` and `err`
        // are writable.
        let status = unsafe { (table.handle)(self.ptr.as_ptr(), &raw, &mut response, &mut err) };
        // A small body is copied (an allocation either way, and no shared
        // reference count to touch); a large one goes out as it is, holding
        // the library loaded until it is sent.
        let body = if response.body.len <= COPIED_BODY {
            Bytes::from(lib.take(response.body))
        } else {
            Bytes::from_owner(PluginBytes {
                library: Arc::clone(lib),
                buffer: response.body,
            })
        };
        let block = response.headers;
        let headers = lib.finish(status, err).and_then(|()| {
            // SAFETY: filled by the plugin, not freed yet.
            response_headers(unsafe { block.as_bytes() })
        });
        lib.free(block);
        Ok(Response {
            status: response.status,
            headers: headers?,
            body,
        })
    }

    /// A v1 library reads its headers as `name: value` lines (UTF-8 values
    /// only, as v1 always did) and answers with a content type.
    fn handle_v1(
        &self,
        table: &v1::PluginApi,
        request: &Request<'_>,
    ) -> Result<Response, CallError> {
        let mut lines = String::with_capacity(request.headers.len() * 32);
        for (name, value) in request.headers {
            if let Ok(value) = value.to_str() {
                lines.push_str(name.as_str());
                lines.push_str(": ");
                lines.push_str(value);
                lines.push('\n');
            }
        }
        let raw = v1::RawRequest {
            method: Slice::new(request.method.as_bytes()),
            path: Slice::new(request.path.as_bytes()),
            query: Slice::new(request.query.as_bytes()),
            headers: Slice::new(lines.as_bytes()),
            body: Slice::new(request.body),
        };
        let mut response = v1::RawResponse {
            status: 0,
            content_type: Buffer::EMPTY,
            body: Buffer::EMPTY,
        };
        let mut err = Buffer::EMPTY;
        let lib = &self.library;
        // SAFETY: `ptr` is a live instance of this library; `raw` borrows
        // `request` for the call; `response` and `err` are writable.
        let status = unsafe { (table.handle)(self.ptr.as_ptr(), &raw, &mut response, &mut err) };
        let content_type = lib.take(response.content_type);
        let body = lib.take(response.body);
        lib.finish(status, err)?;
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_bytes(&content_type) {
            headers.insert(http::header::CONTENT_TYPE, value);
        }
        Ok(Response {
            status: response.status,
            headers,
            body: Bytes::from(body),
        })
    }

    /// Runs `f` with the library and the instance: on its home thread for
    /// a service, here otherwise.
    fn on_home<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Library, *mut c_void) -> T + Send + 'static,
    ) -> Result<T, CallError> {
        match &self.service {
            None => Ok(f(&self.library, self.ptr.as_ptr())),
            Some(service) => {
                let library = Arc::clone(&self.library);
                let ptr = SendPtr(self.ptr.as_ptr());
                service.home.run(move || {
                    let ptr = ptr;
                    f(&library, ptr.0)
                })
            }
        }
    }

    /// The state to hand over, encoded as the library's state version.
    pub fn snapshot(&self) -> Result<Vec<u8>, CallError> {
        self.on_home(|lib, ptr| {
            let snapshot = lib.shared().snapshot;
            let mut out = Buffer::EMPTY;
            let mut err = Buffer::EMPTY;
            // SAFETY: live instance; `out` and `err` are writable.
            let status = unsafe { snapshot(ptr, &mut out, &mut err) };
            lib.finish(status, err)?;
            Ok(lib.take(out))
        })?
    }

    /// The plugin's own health check.
    pub fn health(&self) -> Result<(), CallError> {
        self.on_home(|lib, ptr| {
            let health = lib.shared().health;
            let mut err = Buffer::EMPTY;
            // SAFETY: live instance; `err` is writable.
            let status = unsafe { health(ptr, &mut err) };
            lib.finish(status, err)
        })?
    }

    /// Runs a named hook of the plugin (a step of an upgrade plan).
    pub fn hook(&self, name: &str) -> Result<(), CallError> {
        let name = name.to_owned();
        self.on_home(move |lib, ptr| {
            let hook = lib.shared().hook;
            let mut err = Buffer::EMPTY;
            // SAFETY: live instance; `name` borrowed for the call; `err` is writable.
            let status = unsafe { hook(ptr, Slice::new(name.as_bytes()), &mut err) };
            lib.finish(status, err)
        })?
    }

    /// Hands a request to a service's instance; `None` if the release is
    /// not a service.
    pub fn submit(&self, head: RequestHead) -> Option<Result<Call, Closed>> {
        Some(self.service.as_ref()?.port.submit(head))
    }

    /// A service's calls not finished yet (0 for any other release).
    pub fn open_calls(&self) -> usize {
        self.service.as_ref().map_or(0, |s| s.port.open_calls())
    }

    /// Waits up to `timeout` until a service has no call open; whether it
    /// has none (always, for any other release).
    pub fn wait_calls(&self, timeout: std::time::Duration) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| s.port.wait_idle(timeout))
    }

    /// Cancels a service's calls still open, for `why`; how many, with
    /// the requests under way on the connections it serves (cut when the
    /// instance stops).
    pub fn cancel_calls(&self, why: &'static str) -> usize {
        self.service.as_ref().map_or(0, |s| {
            s.port.cancel_all(why) + s.port.connection_requests() as usize
        })
    }

    /// The service's port, if it serves connections: where the agent
    /// hands them ([`Port::hand`]) and asks them back.
    pub fn connections_port(&self) -> Option<&Arc<Port>> {
        self.service
            .as_ref()
            .map(|s| &s.port)
            .filter(|port| port.serves_connections)
    }

    /// Requests under way: calls not finished, and requests on the
    /// connections it serves.
    pub fn requests_under_way(&self) -> usize {
        self.service.as_ref().map_or(0, |s| {
            s.port.open_calls() + s.port.connection_requests() as usize
        })
    }
}

/// Asks the plugin to join the threads its instance started, if its table
/// has the entry (v2 with `FEATURE_STOP`, every v3), then destroys it.
fn stop_and_destroy(lib: &Library, ptr: *mut c_void) {
    let stopped = match lib.v2() {
        Some(table) if table.features & FEATURE_STOP != 0 => {
            let mut err = Buffer::EMPTY;
            // SAFETY: live instance with no call in flight (it is being
            // dropped); `err` is writable; the entry is within the table.
            let status = unsafe { (table.stop)(ptr, &mut err) };
            lib.finish(status, err)
        }
        _ => Ok(()),
    };
    if let Err(e) = stopped {
        tracing::warn!(version = %lib.version, error = %e, "the release's stop failed");
    }
    let destroy = lib.shared().destroy;
    // SAFETY: `ptr` came from this library's `create` and is destroyed
    // exactly once, here; the library is still open (the caller holds it).
    unsafe { destroy(ptr) };
}

impl Drop for Instance {
    fn drop(&mut self) {
        // A service's port closes first: its release stops taking events,
        // and the agent's side of every call still open ends.
        if let Some(service) = &self.service {
            service.port.close();
        }
        if let Err(e) = self.on_home(stop_and_destroy) {
            tracing::error!(version = %self.library.version, error = %e, "cannot stop the release's instance");
        }
        if let Some(service) = &mut self.service {
            service.home.end();
        }
    }
}
