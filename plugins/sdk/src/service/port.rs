//! The release's end of the host's [`Port`]: each `PortApi` function as a
//! safe method. The link is opened by `attach` and closed at the end of
//! `stop`, after which the port may be gone: a call through a closed (or
//! never opened) link does nothing and reports [`STATUS_GONE`], so a body
//! or task that outlived its instance cannot reach freed host memory.

use std::ffi::c_void;
use std::mem::MaybeUninit;
use std::sync::{PoisonError, RwLock};

use crate::abi::{
    Port, PortApi, PortEvent, RawConnection, RawRequestHead, Slice, STATUS_GONE, STATUS_OK,
};

/// The host's functions and their context.
#[derive(Clone, Copy)]
struct Fns {
    context: *const c_void,
    api: *const PortApi,
}

// SAFETY: the host keeps the port alive and unchanged until `stop`
// returns, and its functions may be called from any thread (ABI v3);
// `PortLink::close` forgets it before `stop` returns.
unsafe impl Send for Fns {}
// SAFETY: as above.
unsafe impl Sync for Fns {}

/// A port as the release's threads use it.
pub(crate) struct PortLink {
    /// Read-locked for each call (no call blocks but `wait_events`, made by
    /// the dispatcher alone, which ends before the link is closed).
    fns: RwLock<Option<Fns>>,
}

impl PortLink {
    pub(crate) fn new() -> PortLink {
        PortLink {
            fns: RwLock::new(None),
        }
    }

    /// Opens the link to `port`; an error if it is open already or the
    /// host's port lacks functions this SDK calls.
    ///
    /// # Safety
    /// `port` is null or a valid [`Port`] that stays valid until
    /// [`PortLink::close`] is called.
    pub(crate) unsafe fn open(&self, port: *const Port) -> Result<(), String> {
        // SAFETY: the caller's contract: null or valid.
        let port = unsafe { port.as_ref() }.ok_or("the host attached no port")?;
        if (port.size as usize) < std::mem::size_of::<Port>() {
            return Err(format!("the host's port is {} bytes, too old", port.size));
        }
        // SAFETY: a valid port's `api` is null or its function table.
        let api = unsafe { port.api.as_ref() }.ok_or("the host's port has no functions")?;
        if (api.size as usize) < std::mem::size_of::<PortApi>() {
            return Err(format!(
                "the host's port functions are {} bytes, too old",
                api.size
            ));
        }
        let mut fns = self.fns.write().unwrap_or_else(PoisonError::into_inner);
        if fns.is_some() {
            return Err("the instance is attached already".to_owned());
        }
        *fns = Some(Fns {
            context: port.context,
            api,
        });
        Ok(())
    }

    /// Forgets the port: every later call reports [`STATUS_GONE`].
    pub(crate) fn close(&self) {
        *self.fns.write().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Runs `f` on the open port, or answers `closed`.
    fn with<R>(&self, closed: R, f: impl FnOnce(&PortApi, *const c_void) -> R) -> R {
        let fns = self.fns.read().unwrap_or_else(PoisonError::into_inner);
        match *fns {
            // SAFETY: an open link's table is valid until `close`, which
            // waits for this read lock.
            Some(fns) => f(unsafe { &*fns.api }, fns.context),
            None => closed,
        }
    }

    /// Blocks until events come; how many were written to `out`, 0 once
    /// the port is closed.
    pub(crate) fn wait_events(&self, out: &mut [PortEvent]) -> usize {
        self.with(0, |api, context| {
            // SAFETY: `out` is writable for `out.len()` events.
            let n = unsafe { (api.wait_events)(context, out.as_mut_ptr(), out.len()) };
            n.min(out.len())
        })
    }

    /// The call's head, lent until `request_done`, or the status saying why not.
    pub(crate) fn request_head(&self, call: u64) -> Result<RawRequestHead, i32> {
        self.with(Err(STATUS_GONE), |api, context| {
            let mut head = MaybeUninit::<RawRequestHead>::uninit();
            // SAFETY: `head` is writable; the host fills it when it answers OK.
            match unsafe { (api.request_head)(context, call, head.as_mut_ptr()) } {
                // SAFETY: written by the host, as its status says.
                STATUS_OK => Ok(unsafe { head.assume_init() }),
                status => Err(status),
            }
        })
    }

    /// Reads body bytes into `dst`: the status and how many were written
    /// (at most `dst.len()`).
    pub(crate) fn read_body(&self, call: u64, dst: &mut [MaybeUninit<u8>]) -> (i32, usize) {
        self.with((STATUS_GONE, 0), |api, context| {
            let mut read = 0;
            // SAFETY: `dst` is writable for its length, `read` for a usize.
            let status = unsafe {
                (api.read_body)(context, call, dst.as_mut_ptr().cast(), dst.len(), &mut read)
            };
            (
                status,
                if status == STATUS_OK {
                    read.min(dst.len())
                } else {
                    0
                },
            )
        })
    }

    pub(crate) fn send_head(&self, call: u64, status: u16, headers: &[u8], body_len: u64) -> i32 {
        self.with(STATUS_GONE, |api, context| {
            // SAFETY: the block is borrowed for the call, which copies it.
            unsafe { (api.send_head)(context, call, status, Slice::new(headers), body_len) }
        })
    }

    pub(crate) fn send_data(&self, call: u64, data: &[u8]) -> i32 {
        self.with(STATUS_GONE, |api, context| {
            // SAFETY: the data is borrowed for the call, which copies it.
            unsafe { (api.send_data)(context, call, Slice::new(data)) }
        })
    }

    pub(crate) fn send_end(&self, call: u64, trailers: &[u8]) -> i32 {
        self.with(STATUS_GONE, |api, context| {
            // SAFETY: the block is borrowed for the call, which copies it.
            unsafe { (api.send_end)(context, call, Slice::new(trailers)) }
        })
    }

    pub(crate) fn abort(&self, call: u64, reason: &str) {
        self.with((), |api, context| {
            // SAFETY: the reason is borrowed for the call, which copies it.
            unsafe { (api.abort)(context, call, Slice::new(reason.as_bytes())) }
        })
    }

    /// Takes connection `id`: its socket is the release's from `Ok` on.
    pub(crate) fn take_connection(&self, id: u64) -> Option<RawConnection> {
        self.with(None, |api, context| {
            let mut taken = MaybeUninit::<RawConnection>::uninit();
            // SAFETY: `taken` is writable; the host fills it when it answers OK.
            match unsafe { (api.take_connection)(context, id, taken.as_mut_ptr()) } {
                // SAFETY: written by the host, as its status says.
                STATUS_OK => Some(unsafe { taken.assume_init() }),
                _ => None,
            }
        })
    }

    pub(crate) fn connection_yielded(&self, id: u64) {
        // SAFETY: a plain call of the host's.
        self.with((), |api, context| unsafe {
            (api.connection_yielded)(context, id)
        })
    }

    /// Gives connection `id` up: closed (`fd` -1) or given back, with the
    /// bytes read and not served. Whether the host took it: if not (the
    /// port closed), the socket is still the caller's to close.
    pub(crate) fn connection_done(&self, id: u64, fd: i32, unread: &[u8]) -> bool {
        self.with(false, |api, context| {
            // SAFETY: `unread` is borrowed for the call, which copies it;
            // `fd` is given up to the host.
            unsafe { (api.connection_done)(context, id, fd, Slice::new(unread)) };
            true
        })
    }

    pub(crate) fn request_begun(&self) {
        // SAFETY: a plain call of the host's.
        self.with((), |api, context| unsafe { (api.request_begun)(context) })
    }

    pub(crate) fn request_ended(&self, status: u16, micros: u64) {
        // SAFETY: a plain call of the host's.
        self.with((), |api, context| unsafe {
            (api.request_ended)(context, status, micros)
        })
    }

    pub(crate) fn request_done(&self, call: u64) {
        // SAFETY: a plain call of the host's; the head it lent is not used after it.
        self.with((), |api, context| unsafe {
            (api.request_done)(context, call)
        })
    }
}
