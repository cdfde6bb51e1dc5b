//! The chat over the punched link, independent of how lines are typed or shown.
//!
//! Lines typed arrive as [`Input`] on a channel; lines received go to an
//! [`Output`]. Leaving is a two-way goodbye so nothing typed is lost:
//! 1. The side that leaves (end of input, `/quit`, Ctrl-C) sends `Bye` after its
//!    last line and keeps reading.
//! 2. The other side, reading `Bye`, has by then received every line before it (the
//!    link is one ordered TCP stream); it reports the departure, answers `Bye`, and
//!    ends.
//! 3. The answering `Bye` proves to the leaving side that everything it sent was
//!    received; only then does it end successfully.

use std::time::Duration;

use punchline_proto::{validate_line, Chat};
use tokio::sync::mpsc;
use tokio::time::timeout;

use crate::error::PeerError;
use crate::secure::SecureLink;

/// How long the leaving side waits for the other's answering goodbye.
pub const BYE_TIMEOUT: Duration = Duration::from_secs(10);

/// Bound on one write to the other peer: a peer that stops reading for this long
/// is treated as gone.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the user did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A line to send.
    Line(String),
    /// End of input or `/quit`: say goodbye and leave.
    Quit,
    /// Ctrl-C: say goodbye and leave.
    Interrupted,
}

/// Where the chat shows things.
pub trait Output {
    /// A line from the other peer (not yet sanitised).
    fn incoming(&mut self, name: &str, text: &str);
    /// A status message for the user.
    fn status(&mut self, message: &str);
}

/// How the chat ended (without error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatEnd {
    /// We left; the other side confirmed it received everything.
    WeLeft,
    /// We were interrupted; the other side confirmed it received everything.
    Interrupted,
    /// The other side left.
    TheyLeft,
}

/// Counters for the end of the chat.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatStats {
    /// Lines sent.
    pub sent: u64,
    /// Lines received.
    pub received: u64,
}

/// Runs the chat until one side leaves or the link fails.
pub async fn chat(
    link: &mut SecureLink,
    their_name: &str,
    input: &mut mpsc::Receiver<Input>,
    output: &mut dyn Output,
    stats: &mut ChatStats,
) -> Result<ChatEnd, PeerError> {
    let end = loop {
        tokio::select! {
            typed = input.recv() => match typed {
                Some(Input::Line(text)) => {
                    if let Err(e) = validate_line(&text) {
                        output.status(&format!("not sent: {e}"));
                        continue;
                    }
                    send(link, Chat::Line { text }, their_name).await?;
                    stats.sent += 1;
                }
                Some(Input::Quit) | None => break ChatEnd::WeLeft,
                Some(Input::Interrupted) => break ChatEnd::Interrupted,
            },
            received = link.recv() => match received {
                Some(Ok(Chat::Line { text })) => {
                    stats.received += 1;
                    output.incoming(their_name, &text);
                }
                Some(Ok(Chat::Bye)) => {
                    // The other side still reads until our answering goodbye: send
                    // the lines already typed first, so none of them is lost.
                    while let Ok(Input::Line(text)) = input.try_recv() {
                        if let Err(e) = validate_line(&text) {
                            output.status(&format!("not sent: {e}"));
                        } else if send(link, Chat::Line { text }, their_name).await.is_ok() {
                            stats.sent += 1;
                        }
                    }
                    // Answer so the other side knows everything arrived.
                    let _ = timeout(BYE_TIMEOUT, link.send(&Chat::Bye)).await;
                    let _ = timeout(BYE_TIMEOUT, link.close()).await;
                    return Ok(ChatEnd::TheyLeft);
                }
                Some(Err(e)) => return Err(lost(their_name, &e)),
                None => return Err(lost(their_name, "closed without a goodbye")),
            },
        }
    };
    send(link, Chat::Bye, their_name).await?;
    // Lines the other side sent before it saw our goodbye still arrive and are shown.
    let answered = timeout(BYE_TIMEOUT, async {
        loop {
            match link.recv().await {
                Some(Ok(Chat::Line { text })) => {
                    stats.received += 1;
                    output.incoming(their_name, &text);
                }
                Some(Ok(Chat::Bye)) => return Ok(()),
                Some(Err(e)) => return Err(lost(their_name, &e)),
                None => return Err(lost(their_name, "closed before confirming our last lines")),
            }
        }
    })
    .await;
    match answered {
        Ok(result) => result?,
        Err(_) => {
            return Err(PeerError::Timeout(format!(
                "{their_name} did not answer our goodbye within {} s: delivery of the last lines is not confirmed",
                BYE_TIMEOUT.as_secs()
            )))
        }
    }
    let _ = timeout(BYE_TIMEOUT, link.close()).await;
    Ok(end)
}

async fn send(link: &mut SecureLink, msg: Chat, their_name: &str) -> Result<(), PeerError> {
    match timeout(SEND_TIMEOUT, link.send(&msg)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(lost(their_name, &e.to_string())),
        Err(_) => Err(PeerError::Timeout(format!(
            "{their_name} stopped reading for {} s",
            SEND_TIMEOUT.as_secs()
        ))),
    }
}

fn lost(their_name: &str, why: &str) -> PeerError {
    PeerError::LinkLost {
        name: their_name.to_owned(),
        why: why.to_owned(),
    }
}
