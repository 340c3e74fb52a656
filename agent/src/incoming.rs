//! The control plane's accept loop: at most `--max-control-connections`
//! open at once (beyond, connections wait in the listen backlog), and a
//! connection that sends nothing within [`FIRST_BYTE_TIMEOUT`] is dropped
//! — so a stranger who cannot authenticate cannot hold the control plane's
//! slots or file descriptors either.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long a new connection may stay silent (no TLS ClientHello, no
/// HTTP/2 preface).
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(10);

/// The accepted connections, for tonic's `serve_with_incoming_shutdown`.
pub fn capped(listener: TcpListener, max: usize) -> ReceiverStream<io::Result<Capped>> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(max));
        loop {
            let accepted = tokio::select! {
                () = tx.closed() => return,
                permit = Arc::clone(&slots).acquire_owned() => {
                    let permit = permit.expect("never closed");
                    tokio::select! {
                        () = tx.closed() => return,
                        accepted = listener.accept() => accepted.map(|(stream, _)| (stream, permit)),
                    }
                }
            };
            let (stream, permit) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::warn!(error = %e, "control plane accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // Without TCP_NODELAY a reply's trailers wait ~40 ms for the
            // client's delayed ACK.
            let _ = stream.set_nodelay(true);
            let connection = Capped {
                inner: stream,
                silent: Some(Box::pin(tokio::time::sleep(FIRST_BYTE_TIMEOUT))),
                _slot: permit,
            };
            if tx.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// A control-plane connection holding its slot.
pub struct Capped {
    inner: TcpStream,
    /// Until the first byte comes.
    silent: Option<Pin<Box<Sleep>>>,
    _slot: OwnedSemaphorePermit,
}

impl Connected for Capped {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Capped {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if let Some(silent) = &mut self.silent {
            if silent.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "nothing received on a new control-plane connection",
                )));
            }
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.silent = None;
        }
        polled
    }
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
