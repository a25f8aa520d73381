//! A tonic gRPC service behind the rate limit layer, keyed by the
//! `x-api-key` metadata entry, and a client mode to watch it work.
//!
//! ```text
//! cargo run --example grpc                                  # the server on 127.0.0.1:50051
//! cargo run --example grpc -- client --key team-a --calls 8 # 5 OK, then RESOURCE_EXHAUSTED
//! cargo run --example grpc -- client --no-key               # INVALID_ARGUMENT: the key is required
//! ```
//!
//! Each API key may make `--limit` calls per minute (default 5), counted in
//! Redis so that every instance of the service shares them. A call over the
//! limit gets `RESOURCE_EXHAUSTED` (`grpc-status: 8`) with a message naming
//! the policy; a call without `x-api-key` gets `INVALID_ARGUMENT`. While
//! Redis is down each instance limits on its own (in-process) and the
//! service keeps answering.
//!
//! No `.proto` file and no `protoc`: the two messages are written with
//! `prost` derives and the service by hand, the way tonic's generated code
//! does it (`tonic::server::Grpc` / `tonic::client::Grpc` with the prost
//! codec). The wire format is that of this proto:
//!
//! ```proto
//! package demo;
//! service Greeter { rpc SayHello (HelloRequest) returns (HelloReply); }
//! message HelloRequest { string name = 1; }
//! message HelloReply { string message = 1; }
//! ```
//!
//! Server options: `--listen ADDR` (default `127.0.0.1:50051`; port 0 picks
//! a free one, named in the log line `listening on http://…`), `--limit N`.
//! Client options: `--server URL` (default `http://127.0.0.1:50051`),
//! `--key KEY` (default `team-a`) or `--no-key`, `--calls N` (default 8).
//! Environment: `REDIS_URL` (default `redis://127.0.0.1:6379`; `memory` for
//! in-process limits only), `RUST_LOG`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http::uri::PathAndQuery;
use tonic::codegen::{Body, BoxFuture, Service, StdError, http};
use tonic::server::{NamedService, UnaryService};
use tonic::transport::{Channel, Server};
use tonic::{Code, Request, Response, Status};
use tonic_prost::ProstCodec;
use tower_redis_ratelimit::{Key, MissingKey, Policy, RateLimitLayer};

mod support;

const USAGE: &str = "\
usage: grpc [--listen ADDR] [--limit N]
       grpc client [--server URL] [--key KEY | --no-key] [--calls N]

  server mode (default): a Greeter service limited to N calls per minute per x-api-key (default 5)
    --listen ADDR   where to listen (default 127.0.0.1:50051; port 0 picks a free one)
  client mode: makes N SayHello calls (default 8) and counts the answers
    --server URL    the server (default http://127.0.0.1:50051)
    --key KEY       the x-api-key to send (default team-a); --no-key sends none

environment: REDIS_URL (default redis://127.0.0.1:6379; `memory` for in-process limits only), RUST_LOG";

/// The messages, as prost would generate them from the proto above.
mod pb {
    /// `demo.HelloRequest`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct HelloRequest {
        /// Whom to greet.
        #[prost(string, tag = "1")]
        pub(crate) name: String,
    }

    /// `demo.HelloReply`.
    #[derive(Clone, PartialEq, prost::Message)]
    pub(crate) struct HelloReply {
        /// The greeting.
        #[prost(string, tag = "1")]
        pub(crate) message: String,
    }
}

const SERVICE_NAME: &str = "demo.Greeter";
const SAY_HELLO: &str = "/demo.Greeter/SayHello";

#[derive(Debug, Clone, PartialEq)]
enum Mode {
    Server {
        listen: SocketAddr,
        limit: u32,
    },
    Client {
        server: String,
        key: Option<String>,
        calls: u32,
    },
}

#[tokio::main]
async fn main() {
    let mode = match parse_args(std::env::args().skip(1)) {
        Ok(Some(mode)) => mode,
        Ok(None) => {
            eprintln!("{USAGE}");
            return;
        }
        Err(problem) => {
            eprintln!("grpc: {problem}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let result = match mode {
        Mode::Server { listen, limit } => serve(listen, limit).await,
        Mode::Client { server, key, calls } => client(&server, key.as_deref(), calls).await,
    };
    if let Err(error) = result {
        eprintln!("error: {error}");
        std::process::exit(1);
    }
}

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Option<Mode>, String> {
    let mut args = args.into_iter().peekable();
    let client = args.next_if(|a| a == "client").is_some();
    let mut listen = SocketAddr::from(([127, 0, 0, 1], 50051));
    let mut limit = 5;
    let mut server = "http://127.0.0.1:50051".to_owned();
    let mut key = Some("team-a".to_owned());
    let mut calls = 8;
    while let Some(arg) = args.next() {
        if arg == "-h" || arg == "--help" {
            return Ok(None);
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        let positive = |flag: &str, text: String| {
            text.parse::<u32>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} {text:?} is not a positive number"))
        };
        match (client, flag.as_str()) {
            (false, "--listen") => {
                let text = value()?;
                listen = text.parse().map_err(|_| {
                    format!("--listen {text:?} is not an address like 127.0.0.1:50051")
                })?;
            }
            (false, "--limit") => limit = positive("--limit", value()?)?,
            (true, "--server") => server = value()?,
            (true, "--key") => key = Some(value()?).filter(|k| !k.is_empty()),
            (true, "--no-key") => key = None,
            (true, "--calls") => calls = positive("--calls", value()?)?,
            (_, other) => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(Some(if client {
        Mode::Client { server, key, calls }
    } else {
        Mode::Server { listen, limit }
    }))
}

async fn serve(listen: SocketAddr, limit: u32) -> Result<(), Box<dyn std::error::Error>> {
    support::init_tracing();
    let redis = support::redis_from_env().await?;
    let limits = RateLimitLayer::builder(redis)
        .policy(
            Policy::gcra("per-key", limit, Duration::from_secs(60)).key(Key::header("x-api-key")),
        )
        // No key: INVALID_ARGUMENT (for gRPC calls; HTTP would get a 400).
        .on_missing_key(MissingKey::Reject)
        .build()?;

    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen} ({e}); pick another --listen"))?;
    tracing::info!(
        "listening on http://{} ({limit} calls per minute per x-api-key)",
        listener.local_addr()?
    );
    Server::builder()
        .layer(limits)
        .add_service(Greeter)
        .serve_with_incoming_shutdown(
            tonic::codegen::tokio_stream::wrappers::TcpListenerStream::new(listener),
            support::shutdown_signal(),
        )
        .await?;
    tracing::info!("stopped");
    Ok(())
}

/// The `demo.Greeter` service: routes `SayHello` to [`SayHello`].
#[derive(Debug, Clone, Copy)]
struct Greeter;

impl NamedService for Greeter {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> Service<http::Request<B>> for Greeter
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() == SAY_HELLO {
            Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(ProstCodec::default());
                Ok(grpc.unary(SayHello, request).await)
            })
        } else {
            let path = request.uri().path().to_owned();
            Box::pin(
                async move { Ok(Status::unimplemented(format!("no method {path}")).into_http()) },
            )
        }
    }
}

/// The `SayHello` method.
#[derive(Debug, Clone, Copy)]
struct SayHello;

impl UnaryService<pb::HelloRequest> for SayHello {
    type Response = pb::HelloReply;
    type Future = BoxFuture<Response<pb::HelloReply>, Status>;

    fn call(&mut self, request: Request<pb::HelloRequest>) -> Self::Future {
        Box::pin(async move {
            // Only calls within the key's quota get here.
            let key = request
                .metadata()
                .get("x-api-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            let name = request.into_inner().name;
            let name = if name.is_empty() {
                "world".to_owned()
            } else {
                name
            };
            Ok(Response::new(pb::HelloReply {
                message: format!("Hello, {name} (key {key})"),
            }))
        })
    }
}

/// Client mode: `calls` SayHello calls in a row, each answer printed, then
/// the counts per status.
#[expect(clippy::print_stdout, reason = "client mode reports on the terminal")]
async fn client(
    server: &str,
    key: Option<&str>,
    calls: u32,
) -> Result<(), Box<dyn std::error::Error>> {
    let channel = Channel::from_shared(server.to_owned())
        .map_err(|e| format!("--server {server:?} is not a URL ({e})"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {server}: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    let mut ok = 0;
    let mut exhausted = 0;
    let mut other = 0;
    for call in 1..=calls {
        grpc.ready()
            .await
            .map_err(|e| format!("the connection to {server} failed: {e}"))?;
        let mut request = Request::new(pb::HelloRequest {
            name: format!("call {call}"),
        });
        if let Some(key) = key {
            request.metadata_mut().insert(
                "x-api-key",
                key.parse()
                    .map_err(|_| format!("--key {key:?} cannot be sent as metadata"))?,
            );
        }
        let answer: Result<Response<pb::HelloReply>, Status> = grpc
            .unary(
                request,
                PathAndQuery::from_static(SAY_HELLO),
                ProstCodec::default(),
            )
            .await;
        match answer {
            Ok(reply) => {
                ok += 1;
                println!("{call}: OK {}", reply.into_inner().message);
            }
            Err(status) => {
                if status.code() == Code::ResourceExhausted {
                    exhausted += 1;
                } else {
                    other += 1;
                }
                println!("{call}: {} {}", code_name(status.code()), status.message());
            }
        }
    }
    println!("OK: {ok}, RESOURCE_EXHAUSTED: {exhausted}, other: {other}");
    Ok(())
}

/// The status names of the gRPC spec (`RESOURCE_EXHAUSTED`, not `ResourceExhausted`).
fn code_name(code: Code) -> String {
    let camel = format!("{code:?}");
    let mut name = String::new();
    for (i, c) in camel.char_indices() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Option<Mode>, String> {
        parse_args(list.iter().map(|s| (*s).to_owned()))
    }

    #[test]
    fn modes() {
        assert_eq!(
            args(&[]),
            Ok(Some(Mode::Server {
                listen: "127.0.0.1:50051".parse().unwrap(),
                limit: 5
            }))
        );
        assert_eq!(
            args(&["client", "--no-key", "--calls=3"]),
            Ok(Some(Mode::Client {
                server: "http://127.0.0.1:50051".to_owned(),
                key: None,
                calls: 3
            }))
        );
        assert!(args(&["client", "--listen", "x"]).is_err());
        assert!(args(&["--calls", "3"]).is_err());
        assert!(args(&["--limit", "0"]).is_err());
        assert!(args(&["client", "--calls"]).is_err());
    }

    #[test]
    fn code_names_follow_the_spec() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::InvalidArgument), "INVALID_ARGUMENT");
        assert_eq!(code_name(Code::Ok), "OK");
    }
}
