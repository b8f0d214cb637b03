//! The one server-sent-events writer: chat (`event:` named frames) and the
//! OpenAI-compatible completions (`data:` frames ending with `[DONE]`).

use actix_web::web::Bytes;
use actix_web::{HttpResponse, HttpResponseBuilder};
use futures_util::Stream;

/// One frame: `event: NAME` (when named) and `data: DATA`.
pub fn frame(event: Option<&str>, data: &dyn std::fmt::Display) -> Bytes {
    match event {
        Some(name) => Bytes::from(format!("event: {name}\ndata: {data}\n\n")),
        None => Bytes::from(format!("data: {data}\n\n")),
    }
}

/// A streamed `text/event-stream` response (not buffered by proxies).
pub fn response<S>(mut resp: HttpResponseBuilder, frames: S) -> HttpResponse
where
    S: Stream<Item = Bytes> + 'static,
{
    use futures_util::StreamExt;
    resp.content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(frames.map(Ok::<Bytes, actix_web::Error>))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_named_or_plain_data() {
        assert_eq!(frame(Some("token"), &"{}"), Bytes::from("event: token\ndata: {}\n\n"));
        assert_eq!(frame(None, &"[DONE]"), Bytes::from("data: [DONE]\n\n"));
    }
}
