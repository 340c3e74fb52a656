//! [`Library`]: one opened plugin library; [`Instance`]: one running
//! instance of its plugin.

use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use libloading::os::unix::{Library as DlLibrary, RTLD_LOCAL, RTLD_NOW};
use nine9s_sdk::abi::{
    Buffer, PluginApi, RawRequest, RawResponse, Slice, ABI_VERSION, ABI_VERSION_SYMBOL, API_SYMBOL,
    STATUS_ERROR, STATUS_OK, STATUS_PANIC,
};
use nine9s_sdk::{Request, Response};

use crate::maps::{forget_released, is_mapped, note_released_but_mapped};
use crate::{CallError, LoadError};

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
    /// Points into the library's static data; valid while `dl` is open.
    api: NonNull<PluginApi>,
    dl: Option<DlLibrary>,
}

// SAFETY: `api` points to an immutable `'static` table inside the library
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
        register_open(&path);
        // From here on, dropping `library` closes the handle.
        let mut library = Library {
            path,
            name: String::new(),
            version: String::new(),
            state_version: 0,
            api: NonNull::dangling(),
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
        if found != ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                path: self.path.clone(),
                found,
                expected: ABI_VERSION,
            });
        }
        // SAFETY: a library of ABI version 1 exports this symbol as
        // `extern "C" fn() -> *const PluginApi` (the SDK's macro), which
        // only returns the address of a static and cannot unwind.
        let table = unsafe {
            let entry = dl
                .get::<extern "C" fn() -> *const PluginApi>(API_SYMBOL)
                .map_err(|_| missing(API_SYMBOL))?;
            entry()
        };
        let bad = |reason: String| LoadError::BadTable {
            path: self.path.clone(),
            reason,
        };
        let api = NonNull::new(table.cast_mut()).ok_or_else(|| bad("null table".into()))?;
        // SAFETY: non-null and pointing at the SDK's `'static` table, valid while `dl` is open.
        let table = unsafe { api.as_ref() };
        if table.abi_version != ABI_VERSION {
            return Err(LoadError::AbiMismatch {
                path: self.path.clone(),
                found: table.abi_version,
                expected: ABI_VERSION,
            });
        }
        // SAFETY: the SDK fills name and version from `'static` string literals.
        let (name, version) = unsafe { (table.name.as_bytes(), table.version.as_bytes()) };
        self.name =
            String::from_utf8(name.to_vec()).map_err(|_| bad("name is not UTF-8".into()))?;
        self.version =
            String::from_utf8(version.to_vec()).map_err(|_| bad("version is not UTF-8".into()))?;
        self.state_version = table.state_version;
        self.api = api;
        Ok(())
    }

    fn api(&self) -> &PluginApi {
        // SAFETY: checked non-null in `check_abi`; the table is static data
        // of the library, which stays open as long as `self` lives.
        unsafe { self.api.as_ref() }
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

    /// The state version this code snapshots and restores; 0 for none.
    pub fn state_version(&self) -> u32 {
        self.state_version
    }

    /// Whether this library knows a chain of migrations between two state versions.
    pub fn can_migrate(&self, from: u32, to: u32) -> bool {
        // SAFETY: an SDK export; it catches panics and touches no caller memory.
        unsafe { (self.api().can_migrate)(from, to) }
    }

    /// Migrates a state snapshot from one state version to another.
    pub fn migrate(&self, from: u32, to: u32, state: &[u8]) -> Result<Vec<u8>, CallError> {
        let mut out = Buffer::EMPTY;
        let mut err = Buffer::EMPTY;
        // SAFETY: `state` is borrowed for the call; `out` and `err` are writable.
        let status =
            unsafe { (self.api().migrate)(from, to, Slice::new(state), &mut out, &mut err) };
        self.finish(status, err)?;
        Ok(self.take(out))
    }

    /// Starts an instance, from a snapshot of [`Self::state_version`] or fresh.
    pub fn instantiate(self: &Arc<Self>, state: Option<&[u8]>) -> Result<Instance, CallError> {
        let slice = state.map(Slice::new);
        let state_ptr = slice
            .as_ref()
            .map_or(std::ptr::null(), |s| s as *const Slice);
        let mut out: *mut c_void = std::ptr::null_mut();
        let mut err = Buffer::EMPTY;
        // SAFETY: `state_ptr` is null or points to a slice borrowed for the
        // call; `out` and `err` are writable.
        let status = unsafe { (self.api().create)(state_ptr, &mut out, &mut err) };
        self.finish(status, err)?;
        let ptr = NonNull::new(out)
            .ok_or_else(|| CallError::Failed("plugin created a null instance".into()))?;
        Ok(Instance {
            library: Arc::clone(self),
            ptr,
        })
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

    /// Copies a plugin buffer and gives it back to the plugin.
    fn take(&self, buffer: Buffer) -> Vec<u8> {
        // SAFETY: the buffer was filled by this library and is not freed yet.
        let bytes = unsafe { buffer.as_bytes() }.to_vec();
        if !buffer.ptr.is_null() {
            // SAFETY: the buffer came from this library's allocator; freed once, here.
            unsafe { (self.api().free)(buffer) };
        }
        bytes
    }

    fn take_string(&self, buffer: Buffer) -> String {
        String::from_utf8_lossy(&self.take(buffer)).into_owned()
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
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    match open.iter_mut().find(|(p, _)| p == path) {
        Some((_, count)) => *count += 1,
        None => open.push((path.to_owned(), 1)),
    }
    forget_released(path);
}

/// Returns how many handles on `path` remain open.
fn unregister_open(path: &Path) -> usize {
    let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
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
}

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
        let raw = RawRequest {
            method: Slice::new(request.method.as_bytes()),
            path: Slice::new(request.path.as_bytes()),
            query: Slice::new(request.query.as_bytes()),
            headers: Slice::new(request.headers.as_bytes()),
            body: Slice::new(request.body),
        };
        let mut response = RawResponse {
            status: 0,
            content_type: Buffer::EMPTY,
            body: Buffer::EMPTY,
        };
        let mut err = Buffer::EMPTY;
        let lib = &self.library;
        // SAFETY: `ptr` is a live instance of this library; `raw` borrows
        // `request` for the call; `response` and `err` are writable.
        let status =
            unsafe { (lib.api().handle)(self.ptr.as_ptr(), &raw, &mut response, &mut err) };
        lib.finish(status, err)?;
        let content_type = String::from_utf8_lossy(&lib.take(response.content_type)).into_owned();
        Ok(Response {
            status: response.status,
            content_type,
            body: lib.take(response.body),
        })
    }

    /// The state to hand over, encoded as the library's state version.
    pub fn snapshot(&self) -> Result<Vec<u8>, CallError> {
        let mut out = Buffer::EMPTY;
        let mut err = Buffer::EMPTY;
        let lib = &self.library;
        // SAFETY: live instance; `out` and `err` are writable.
        let status = unsafe { (lib.api().snapshot)(self.ptr.as_ptr(), &mut out, &mut err) };
        lib.finish(status, err)?;
        Ok(lib.take(out))
    }

    /// The plugin's own health check.
    pub fn health(&self) -> Result<(), CallError> {
        let mut err = Buffer::EMPTY;
        let lib = &self.library;
        // SAFETY: live instance; `err` is writable.
        let status = unsafe { (lib.api().health)(self.ptr.as_ptr(), &mut err) };
        lib.finish(status, err)
    }

    /// Runs a named hook of the plugin (a step of an upgrade plan).
    pub fn hook(&self, name: &str) -> Result<(), CallError> {
        let mut err = Buffer::EMPTY;
        let lib = &self.library;
        // SAFETY: live instance; `name` borrowed for the call; `err` is writable.
        let status =
            unsafe { (lib.api().hook)(self.ptr.as_ptr(), Slice::new(name.as_bytes()), &mut err) };
        lib.finish(status, err)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from this library's `create` and is destroyed
        // exactly once, here; the library is still open (we hold an Arc).
        unsafe { (self.library.api().destroy)(self.ptr.as_ptr()) };
    }
}
