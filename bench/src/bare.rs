//! The baseline: a plain hyper 1 HTTP/1 server answering every request
//! with 200 `Hello world!`, served the way the agent serves (tokio
//! multi-thread runtime, one task per connection, `TCP_NODELAY`), so the
//! difference to the agent is the plugin call path. Runs in the bench's own
//! binary under `--bare-server`: prints its port on stdout, serves until
//! its stdin closes.

use std::convert::Infallible;
use std::io::Write;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

pub async fn serve() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", listener.local_addr()?.port())?;
    stdout.flush()?;
    // The parent holds our stdin: when it goes away, even killed, so do we.
    // A plain thread because the workspace's tokio has no `io-std`.
    let (gone, mut parent_gone) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        drop(gone);
    });
    loop {
        tokio::select! {
            _ = &mut parent_gone => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors and the like: back off as the agent does.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                let _ = stream.set_nodelay(true);
                tokio::spawn(
                    http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(hello)),
                );
            }
        }
    }
}

async fn hello(_: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"Hello world!")));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    Ok(response)
}
