//! A small blocking HTTP client for a running vLLM OpenAI server: the model list, the
//! development endpoints a live weight swap needs (`VLLM_SERVER_DEV_MODE=1`: `/pause`,
//! `/collective_rpc`, `/reset_prefix_cache`, `/resume`) and greedy completions with token ids.
//!
//! Every request has a timeout. HTTP error statuses are answers, not transport errors: the
//! callers decide what a 404 or a 500 means.

use std::fmt;
use std::time::Duration;

use serde_json::{json, Value};

/// Errors of the live commands (`aoe swap`, `aoe sweep`): one message for the user.
#[derive(Debug)]
pub struct LiveError(pub String);

impl fmt::Display for LiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for LiveError {}

impl From<crate::Error> for LiveError {
    fn from(e: crate::Error) -> LiveError {
        LiveError(e.to_string())
    }
}

/// Result of the live commands.
pub(crate) type LiveResult<T> = std::result::Result<T, LiveError>;

/// Builds a [`LiveError`] from a format string.
#[macro_export]
macro_rules! live_err {
    ($($t:tt)*) => { $crate::commands::vllm::LiveError(format!($($t)*)) };
}

/// How long the control requests (model list, pause, reset, resume, describe) may take.
pub(crate) const CONTROL_TIMEOUT: Duration = Duration::from_secs(60);

/// An HTTP answer: status and body text.
#[derive(Debug)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// Body, as text (lossy).
    pub body: String,
}

impl Answer {
    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body parsed as JSON (`Value::Null` if it is empty or not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// A short form for error messages: status and the start of the body (its `detail`,
    /// `error` or `message` field when it is JSON).
    pub fn brief(&self) -> String {
        let v = self.json();
        let msg = ["error", "detail", "message"]
            .iter()
            .find_map(|k| {
                let f = v.get(k)?;
                Some(match f {
                    Value::String(s) => s.clone(),
                    Value::Object(o) => o
                        .get("message")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| f.to_string()),
                    other => other.to_string(),
                })
            })
            .unwrap_or_else(|| self.body.trim().to_string());
        let mut msg: String = msg.chars().take(400).collect();
        if msg.is_empty() {
            msg = "(empty body)".into();
        }
        format!("HTTP {}: {msg}", self.status)
    }
}

/// The model a server serves, from `GET /v1/models`.
#[derive(Clone, Debug)]
pub struct Served {
    /// The name requests must use (`model` of a completion request).
    pub id: String,
    /// The path it was loaded from (`root`), when the server says.
    pub root: Option<String>,
}

/// One completion's output.
#[derive(Clone, Debug)]
pub struct Completion {
    /// Generated token ids.
    pub token_ids: Vec<u64>,
    /// Generated text (empty when the server runs without a tokenizer).
    pub text: String,
    /// Why generation stopped (`length`, `stop`).
    pub finish_reason: Option<String>,
}

/// A vLLM server at a base URL such as `http://127.0.0.1:8000`.
pub struct Vllm {
    /// Base URL without a trailing slash.
    pub url: String,
    agent: ureq::Agent,
}

impl Vllm {
    /// A client for the server at `url` (`http://` is added when no scheme is given).
    pub fn new(url: &str) -> Vllm {
        let mut url = url.trim().trim_end_matches('/').to_string();
        if !url.contains("://") {
            url = format!("http://{url}");
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A fresh connection per request: the server may close one after an error answer,
            // and a pooled dead connection would fail the next request (the rollback reload).
            .max_idle_connections(0)
            .max_idle_connections_per_host(0)
            .build()
            .into();
        Vllm { url, agent }
    }

    /// One request: `GET` without a body, `POST` with `body` (JSON) or an empty one.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> LiveResult<Answer> {
        let url = format!("{}{}", self.url, path);
        let res = if method == "GET" {
            self.agent
                .get(&url)
                .config()
                .timeout_global(Some(timeout))
                .build()
                .call()
        } else {
            let req = self
                .agent
                .post(&url)
                .config()
                .timeout_global(Some(timeout))
                .build();
            match body {
                Some(b) => req
                    .header("Content-Type", "application/json")
                    .send(b.to_string().as_bytes()),
                None => req.send_empty(),
            }
        };
        let what = format!("{method} {url}");
        let mut resp = res.map_err(|e| match e {
            ureq::Error::Timeout(_) => {
                live_err!("{what}: no answer within {:.0} s", timeout.as_secs_f64())
            }
            ureq::Error::Io(ref io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
                live_err!(
                    "cannot reach vLLM at {}: connection refused ({what})",
                    self.url
                )
            }
            other => live_err!("cannot reach vLLM at {}: {other} ({what})", self.url),
        })?;
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| live_err!("{what}: reading the answer: {e}"))?;
        Ok(Answer { status, body })
    }

    /// `GET /v1/models`: the first model served.
    pub fn served(&self) -> LiveResult<Served> {
        let a = self.request("GET", "/v1/models", None, CONTROL_TIMEOUT)?;
        if !a.ok() {
            return Err(live_err!(
                "GET {}/v1/models: {} (is this a vLLM OpenAI server?)",
                self.url,
                a.brief()
            ));
        }
        let v = a.json();
        let m = v
            .get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .ok_or_else(|| {
                live_err!(
                    "GET {}/v1/models: no model in the answer: {}",
                    self.url,
                    a.body.chars().take(200).collect::<String>()
                )
            })?;
        let id = m
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| live_err!("GET {}/v1/models: a model without an id", self.url))?;
        Ok(Served {
            id: id.to_string(),
            root: m.get("root").and_then(Value::as_str).map(str::to_string),
        })
    }

    /// `POST /collective_rpc` with `method` and `kwargs`; the raw answer.
    pub fn rpc(&self, method: &str, kwargs: Value, timeout: Duration) -> LiveResult<Answer> {
        let body = json!({ "method": method, "kwargs": kwargs });
        self.request("POST", "/collective_rpc", Some(&body), timeout)
    }

    /// `POST path` with an empty body; an error unless the answer is 2xx.
    pub fn post_ok(&self, path: &str, timeout: Duration) -> LiveResult<Answer> {
        let a = self.request("POST", path, None, timeout)?;
        if !a.ok() {
            return Err(live_err!("POST {}{path}: {}", self.url, a.brief()));
        }
        Ok(a)
    }

    /// A greedy completion (temperature 0) of `prompt` (text or a JSON list of token ids),
    /// with the output token ids (`return_token_ids`, which also works with
    /// `--skip-tokenizer-init`).
    pub fn complete(
        &self,
        model: &str,
        prompt: &Value,
        max_tokens: u64,
        ignore_eos: bool,
        timeout: Duration,
    ) -> LiveResult<Completion> {
        let body = json!({
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "seed": 0,
            "ignore_eos": ignore_eos,
            "return_token_ids": true,
        });
        let a = self.request("POST", "/v1/completions", Some(&body), timeout)?;
        if !a.ok() {
            return Err(live_err!("POST {}/v1/completions: {}", self.url, a.brief()));
        }
        let v = a.json();
        let c = v
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .ok_or_else(|| {
                live_err!("POST {}/v1/completions: no choice in the answer", self.url)
            })?;
        let ids = c
            .get("token_ids")
            .and_then(Value::as_array)
            .ok_or_else(|| {
                live_err!(
                    "POST {}/v1/completions: no token_ids in the answer (vLLM too old for \
                     return_token_ids?)",
                    self.url
                )
            })?;
        let token_ids = ids
            .iter()
            .map(|t| {
                t.as_u64().ok_or_else(|| {
                    live_err!("POST /v1/completions: token id {t} is not an integer")
                })
            })
            .collect::<LiveResult<Vec<u64>>>()?;
        Ok(Completion {
            token_ids,
            text: c
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            finish_reason: c
                .get("finish_reason")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}
