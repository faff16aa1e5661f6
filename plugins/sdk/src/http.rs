//! Outbound HTTP over `wasi:http`, as one blocking call: build a [`Request`], [`Request::send`]
//! it, read the [`Response`]. The router lets a request out only to the hosts in the plugin's
//! `allowed_hosts` ([`HttpError::Denied`] otherwise) and caps its timeouts by what is left of
//! the invocation's time limit.

use std::fmt;

use serde::Serialize;

use crate::bindings::wasi::http::outgoing_handler;
use crate::bindings::wasi::http::types::{
    ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;

/// Largest response body read; the rest is dropped.
const MAX_RESPONSE_BYTES: u64 = 1024 * 1024;
/// Most bytes one `blocking-write-and-flush` may carry.
const WRITE_CHUNK: usize = 4096;

/// Why a request got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// The router refused it: the host is not in the plugin's `allowed_hosts`.
    Denied(String),
    /// No connection or no response in time: worth a retry.
    Timeout(String),
    /// The URL or a header is not valid: it would fail again.
    Invalid(String),
    /// The connection failed or broke (refused, reset, DNS, TLS): usually worth a retry.
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Denied(host) => {
                write!(f, "request to {host} denied: the host is not in this plugin's allowed_hosts")
            }
            HttpError::Timeout(why) => write!(f, "timed out: {why}"),
            HttpError::Invalid(why) => write!(f, "invalid request: {why}"),
            HttpError::Failed(why) => write!(f, "request failed: {why}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// A response: its status and body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text, for error messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An outbound request.
#[derive(Debug, Clone)]
pub struct Request {
    method: Method,
    url: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    pub fn get(url: &str) -> Self {
        Request { method: Method::Get, url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn post(url: &str) -> Self {
        Request { method: Method::Post, url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// `Authorization: Bearer <token>`.
    pub fn bearer(self, token: &str) -> Self {
        self.header("authorization", &format!("Bearer {token}"))
    }

    /// A JSON body, with its content type.
    pub fn json<T: Serialize + ?Sized>(mut self, body: &T) -> Result<Self, HttpError> {
        self.body = serde_json::to_vec(body).map_err(|e| HttpError::Invalid(format!("cannot encode the body: {e}")))?;
        Ok(self.header("content-type", "application/json"))
    }

    /// Send the request and wait for the whole response.
    pub fn send(self) -> Result<Response, HttpError> {
        let target = Target::parse(&self.url)?;
        let mut fields: Vec<(String, Vec<u8>)> =
            self.headers.into_iter().map(|(name, value)| (name, value.into_bytes())).collect();
        fields.push(("content-length".into(), self.body.len().to_string().into_bytes()));
        let headers = Fields::from_list(&fields).map_err(|e| HttpError::Invalid(format!("headers: {e:?}")))?;
        let request = OutgoingRequest::new(headers);
        let invalid = |what: &str| HttpError::Invalid(format!("{what} of {}", target.authority));
        request.set_method(&self.method).map_err(|()| invalid("method"))?;
        request.set_scheme(Some(&target.scheme)).map_err(|()| invalid("scheme"))?;
        request.set_authority(Some(&target.authority)).map_err(|()| invalid("authority"))?;
        request.set_path_with_query(Some(&target.path)).map_err(|()| invalid("path"))?;
        let body = request.body().map_err(|()| invalid("body"))?;
        // Send first, then stream the body: the host buffers only a chunk or two of it, and
        // reads it only once the request is under way.
        let pending = outgoing_handler::handle(request, None).map_err(|e| failure(&target.authority, e))?;
        // A request that fails (refused, unreachable) closes the body stream: the reason is
        // in the response, so a failed write only stops the writing.
        let mut written = Ok(());
        {
            let stream = body.write().map_err(|()| invalid("body stream"))?;
            for chunk in self.body.chunks(WRITE_CHUNK) {
                if let Err(e) = stream.blocking_write_and_flush(chunk) {
                    written = Err(HttpError::Failed(format!("writing the body: {e:?}")));
                    break;
                }
            }
        }
        let finished = OutgoingBody::finish(body, None);
        let response = loop {
            match pending.get() {
                Some(result) => break result,
                None => pending.subscribe().block(),
            }
        };
        let response = response
            .map_err(|()| HttpError::Failed("the response was already taken".into()))?
            .map_err(|e| failure(&target.authority, e))?;
        written?;
        finished.map_err(|e| failure(&target.authority, e))?;
        let status = response.status();
        let incoming = response.consume().map_err(|()| HttpError::Failed("no response body".into()))?;
        let body = read_all(&incoming)?;
        drop(IncomingBody::finish(incoming));
        Ok(Response { status, body })
    }
}

/// The parts of a URL `wasi:http` takes separately.
struct Target {
    scheme: Scheme,
    authority: String,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Target, HttpError> {
        let (scheme, rest) = if let Some(rest) = url.strip_prefix("https://") {
            (Scheme::Https, rest)
        } else if let Some(rest) = url.strip_prefix("http://") {
            (Scheme::Http, rest)
        } else {
            return Err(HttpError::Invalid(format!("{url:?} is not an http:// or https:// URL")));
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(at) if rest[at..].starts_with('/') => (&rest[..at], rest[at..].to_string()),
            Some(at) => (&rest[..at], format!("/{}", &rest[at..])),
            None => (rest, "/".to_string()),
        };
        if authority.is_empty() {
            return Err(HttpError::Invalid(format!("{url:?} has no host")));
        }
        if authority.contains('@') {
            return Err(HttpError::Invalid("credentials in the URL: send them in a header".into()));
        }
        Ok(Target { scheme, authority: authority.into(), path })
    }
}

fn read_all(body: &IncomingBody) -> Result<Vec<u8>, HttpError> {
    let stream = body.stream().map_err(|()| HttpError::Failed("no response body stream".into()))?;
    let mut bytes = Vec::new();
    while (bytes.len() as u64) < MAX_RESPONSE_BYTES {
        match stream.blocking_read(MAX_RESPONSE_BYTES - bytes.len() as u64) {
            Ok(chunk) => bytes.extend(chunk),
            Err(StreamError::Closed) => break,
            Err(StreamError::LastOperationFailed(e)) => {
                return Err(HttpError::Failed(format!("reading the response: {}", e.to_debug_string())));
            }
        }
    }
    Ok(bytes)
}

fn failure(authority: &str, code: ErrorCode) -> HttpError {
    match code {
        ErrorCode::HttpRequestDenied => HttpError::Denied(authority.into()),
        ErrorCode::DnsTimeout
        | ErrorCode::ConnectionTimeout
        | ErrorCode::ConnectionReadTimeout
        | ErrorCode::ConnectionWriteTimeout
        | ErrorCode::HttpResponseTimeout => HttpError::Timeout(format!("{authority}: {code:?}")),
        ErrorCode::HttpRequestMethodInvalid | ErrorCode::HttpRequestUriInvalid | ErrorCode::HttpRequestUriTooLong => {
            HttpError::Invalid(format!("{authority}: {code:?}"))
        }
        other => HttpError::Failed(format!("{authority}: {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_scheme_authority_and_path() {
        let t = Target::parse("https://api.resend.com/emails?x=1").unwrap();
        assert!(matches!(t.scheme, Scheme::Https));
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("api.resend.com", "/emails?x=1"));
        let t = Target::parse("http://127.0.0.1:8025").unwrap();
        assert_eq!((t.authority.as_str(), t.path.as_str()), ("127.0.0.1:8025", "/"));
        let t = Target::parse("http://h?q").unwrap();
        assert_eq!(t.path, "/?q");
        assert!(Target::parse("ftp://x").is_err() && Target::parse("http:///x").is_err());
        assert!(Target::parse("https://user:secret@api.resend.com/emails").is_err());
    }
}
