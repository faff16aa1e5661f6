//! Outbound HTTP (`wasi:http/outgoing-handler`), only to the hosts in the plugin's
//! `allowed_hosts`, and never for longer than the invocation has left. wasmtime-wasi-http does
//! the protocol; this module decides whether and how long a request may go out.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use crate::config::AllowedHost;

/// What a plugin's outbound request future resolves to, as wasmtime-wasi-http expects it.
type Sent = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>;

/// The outbound-HTTP policy of one plugin instance.
pub(crate) struct Egress {
    pub(crate) plugin: Arc<str>,
    pub(crate) allowed: Arc<[AllowedHost]>,
    /// When the invocation under way must have finished; copied from the store's state.
    pub(crate) deadline: Instant,
    /// The event of the invocation under way, for the log; copied with the deadline.
    pub(crate) event_id: String,
}

impl Egress {
    /// Whether `uri` may be requested: its host and port (the scheme's default when absent)
    /// match an entry of `allowed_hosts`.
    pub(crate) fn allows(&self, uri: &http::Uri) -> bool {
        let Some(host) = uri.host() else { return false };
        let port = uri.port_u16().unwrap_or(if uri.scheme() == Some(&http::uri::Scheme::HTTPS) { 443 } else { 80 });
        self.allowed.iter().any(|entry| entry.allows(host, port))
    }

    /// The plugin's timeouts, each capped by what is left of the invocation.
    fn options(&self, asked: Option<RequestOptions>) -> RequestOptions {
        let left = self.deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
        let cap = |asked: Option<Duration>| Some(asked.map_or(left, |a| a.min(left)));
        let asked = asked.unwrap_or_default();
        RequestOptions {
            connect_timeout: cap(asked.connect_timeout),
            first_byte_timeout: cap(asked.first_byte_timeout),
            between_bytes_timeout: cap(asked.between_bytes_timeout),
        }
    }
}

impl WasiHttpHooks for Egress {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = Sent> + Send> {
        drop(fut);
        if !self.allows(request.uri()) {
            // The host and port only: an authority may carry credentials.
            tracing::warn!(
                plugin = %self.plugin,
                event_id = %self.event_id,
                host = request.uri().host().unwrap_or(""),
                port = request.uri().port_u16(),
                "outbound HTTP refused: the host is not in the plugin's allowed_hosts"
            );
            return Box::new(async { Err(Error::HttpRequestDenied) });
        }
        let options = self.options(options);
        Box::new(async move {
            let (response, io) = wasmtime_wasi_http::default_send_request(request, Some(options)).await?;
            Ok((response.map(BodyExt::boxed_unsync), Box::new(io) as Box<dyn Future<Output = _> + Send>))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::capture::logged;

    fn egress(hosts: &[&str]) -> Egress {
        Egress {
            plugin: Arc::from("p"),
            allowed: hosts.iter().map(|h| AllowedHost::parse(h).unwrap()).collect(),
            deadline: Instant::now() + Duration::from_secs(2),
            event_id: "e-1".into(),
        }
    }

    #[tokio::test]
    async fn a_refused_request_is_logged_with_its_event_and_host_and_no_credentials() {
        let body = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
        let request = http::Request::get("http://user:hunter2@denied.test:8080/x").body(body).unwrap();
        let mut e = egress(&["allowed.test"]);
        let (sent, log) = logged(|| e.send_request(request, None, Box::new(async { Ok(()) })));
        assert!(Box::into_pin(sent).await.is_err(), "the request is refused");
        assert!(log.contains("outbound HTTP refused"), "{log}");
        assert!(log.contains("event_id=e-1") && log.contains("denied.test") && log.contains("8080"), "{log}");
        assert!(!log.contains("hunter2") && !log.contains("user:"), "{log}");
    }

    #[test]
    fn requests_go_only_to_allowed_hosts_with_the_schemes_default_port() {
        let e = egress(&["api.resend.com", "127.0.0.1:8025"]);
        assert!(e.allows(&"https://api.resend.com/emails".parse().unwrap()));
        assert!(e.allows(&"http://127.0.0.1:8025/emails".parse().unwrap()));
        assert!(!e.allows(&"http://127.0.0.1:8026/emails".parse().unwrap()));
        assert!(!e.allows(&"http://127.0.0.1/emails".parse().unwrap()));
        assert!(!e.allows(&"https://api.resend.com.evil.com/".parse().unwrap()));
        assert!(!egress(&[]).allows(&"https://api.resend.com/".parse().unwrap()));
    }

    #[test]
    fn timeouts_never_outlast_the_invocation() {
        let e = egress(&[]);
        let asked = RequestOptions { connect_timeout: Some(Duration::from_millis(100)), ..Default::default() };
        let options = e.options(Some(asked));
        assert_eq!(options.connect_timeout, Some(Duration::from_millis(100)));
        assert!(options.first_byte_timeout.is_some_and(|t| t <= Duration::from_secs(2)));
        assert!(e.options(None).between_bytes_timeout.is_some_and(|t| t <= Duration::from_secs(2)));
    }
}
