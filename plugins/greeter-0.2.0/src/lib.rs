//! greeter: a tonic gRPC service (`greeter.v1.Greeter`, from
//! `plugins/greeter-proto`) served by nine9s as an async release. Unary
//! `SayHello` answers with the version and counts the calls, a count
//! carried across upgrades (state version 1, a little-endian u64);
//! server-streaming `Countdown` sends a tick every `interval_ms` from a
//! timer on the release's runtime. The generated server is the whole
//! service: the agent hands it every HTTP/2 request as it comes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::BoxStream;
use greeter_proto::greeter_server::{Greeter, GreeterServer};
use greeter_proto::{CountdownRequest, HelloReply, HelloRequest, Tick};
use nine9s_sdk::service::{AsyncPlugin, HttpService};
use tonic::{Request, Response, Status};

const VERSION: &str = env!("CARGO_PKG_VERSION");

pub struct App;

/// The SayHello calls served: what crosses upgrades, and the service.
pub struct Counter(AtomicU64);

impl AsyncPlugin for App {
    const STATE_VERSION: u32 = 1;
    type State = Counter;

    fn restore(state: Option<&[u8]>) -> Result<Counter, String> {
        let count = match state {
            None => 0,
            Some(bytes) => u64::from_le_bytes(
                bytes
                    .try_into()
                    .map_err(|_| format!("state v1 is 8 bytes, got {}", bytes.len()))?,
            ),
        };
        Ok(Counter(AtomicU64::new(count)))
    }

    fn service(state: Arc<Counter>) -> HttpService {
        HttpService::new(GreeterServer::from_arc(state))
    }

    fn snapshot(state: &Counter) -> Vec<u8> {
        state.0.load(Ordering::Relaxed).to_le_bytes().to_vec()
    }
}

#[tonic::async_trait]
impl Greeter for Counter {
    async fn say_hello(
        &self,
        request: Request<HelloRequest>,
    ) -> Result<Response<HelloReply>, Status> {
        let count = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        let name = request.into_inner().name;
        Ok(Response::new(HelloReply {
            message: format!("hello {name} from greeter {VERSION}"),
            version: VERSION.to_owned(),
            count,
        }))
    }

    type CountdownStream = BoxStream<'static, Result<Tick, Status>>;

    async fn countdown(
        &self,
        request: Request<CountdownRequest>,
    ) -> Result<Response<Self::CountdownStream>, Status> {
        let CountdownRequest { from, interval_ms } = request.into_inner();
        let interval = Duration::from_millis(interval_ms.into());
        let ticks = futures_util::stream::unfold(from, move |n| async move {
            if n == 0 {
                return None;
            }
            tokio::time::sleep(interval).await;
            let tick = Tick {
                n,
                version: VERSION.to_owned(),
            };
            Some((Ok(tick), n - 1))
        });
        Ok(Response::new(Box::pin(ticks)))
    }
}

nine9s_sdk::export_service!(App, name = "greeter");
