//! The HTTP side of `immp serve`: hyper 1 (HTTP/1.1, keep-alive) on a current-thread tokio
//! runtime of its own thread. Two routes, `/metrics` and `/healthz`; 404 elsewhere. It only
//! reads what the sampling thread published, so it never delays a sample or a cap.
use std::{
    convert::Infallible,
    net::TcpListener,
    sync::Arc,
    thread::JoinHandle,
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{Semaphore, watch};

use super::{Published, health, now_ms};
use crate::view::metrics;

/// Connections served at once; more wait in the kernel's backlog (loopback scrapers are few;
/// this bounds what a flood can cost).
const MAX_CONNECTIONS: usize = 256;

/// A client that sends no complete request header in this long is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Server {
    stop: watch::Sender<bool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves on `listener` (already bound: a failure to bind was the caller's bad input).
    pub fn start(listener: TcpListener, published: Arc<Published>) -> anyhow::Result<Self> {
        listener.set_nonblocking(true)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let (stop, stopped) = watch::channel(false);
        let thread = std::thread::Builder::new()
            .name("immp-http".into())
            .spawn(move || {
                let p = published.clone();
                if let Err(e) = rt.block_on(accept_loop(listener, published, stopped)) {
                    eprintln!("immp serve: error: HTTP server: {e}");
                    p.http_failed
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops accepting, drops open connections, and waits for the thread.
    pub fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Accepts until told to stop (Ok); an error only if the listener cannot be used at all.
async fn accept_loop(
    listener: TcpListener,
    published: Arc<Published>,
    mut stopped: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let started = Instant::now();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = stopped.changed() => return Ok(()),
        };
        // The semaphore is never closed.
        let Ok(permit) = permit else { return Ok(()) };
        let (sock, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(c) => c,
                // Out of file descriptors and the like: try again shortly, never spin.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.changed() => return Ok(()),
        };
        let published = published.clone();
        let mut stop = stopped.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let published = published.clone();
                async move { Ok::<_, Infallible>(route(&req, &published, started)) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(sock), svc);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
            drop(permit);
        });
    }
}

fn route(req: &Request<Incoming>, p: &Published, started: Instant) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != "/metrics" && path != "/healthz" {
        return text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics or /healthz\n",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n");
    }
    if path == "/healthz" {
        let (ok, line) = health(p, now_ms(), started);
        let status = if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        return text(status, &line);
    }
    let body = p
        .metrics
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    r
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
