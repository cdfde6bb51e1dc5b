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

use punchline_proto::{sanitize_for_terminal, validate_line, validate_name, Chat};
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
    /// `/nick NAME`: go by another name.
    Nick(String),
    /// `/info`: show the link's details.
    Info,
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

/// Counters for the end of the chat and `/info`.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChatStats {
    /// Lines sent.
    pub sent: u64,
    /// Lines received.
    pub received: u64,
}

/// The chat's state beside the link: who is who, what `/info` tells, counters.
#[derive(Debug, Clone, Default)]
pub struct ChatContext {
    /// The other side's name, sanitised for display; changes with their `/nick`.
    pub their_name: String,
    /// Our name; changes with our `/nick`.
    pub our_name: String,
    /// What `/info` shows beside the live numbers: (label, value).
    pub facts: Vec<(String, String)>,
    /// Lines each way.
    pub stats: ChatStats,
}

/// Runs the chat until one side leaves or the link fails.
pub async fn chat(
    link: &mut SecureLink,
    ctx: &mut ChatContext,
    input: &mut mpsc::Receiver<Input>,
    output: &mut dyn Output,
) -> Result<ChatEnd, PeerError> {
    let end = loop {
        tokio::select! {
            typed = input.recv() => match typed {
                Some(Input::Line(text)) => send_line(link, ctx, output, text).await?,
                Some(Input::Nick(name)) => {
                    if let Err(e) = validate_name(&name) {
                        output.status(&format!("name not changed: {e}"));
                        continue;
                    }
                    send(link, Chat::Nick { name: name.clone() }, &ctx.their_name).await?;
                    output.status(&format!("you are now known as {name}"));
                    ctx.our_name = name;
                }
                Some(Input::Info) => {
                    for line in info_lines(link, ctx) {
                        output.status(&line);
                    }
                }
                Some(Input::Quit) | None => break ChatEnd::WeLeft,
                Some(Input::Interrupted) => break ChatEnd::Interrupted,
            },
            received = link.recv() => match received {
                Some(Ok(Chat::Bye)) => {
                    // The other side still reads until our answering goodbye: send
                    // the lines already typed first, so none of them is lost.
                    while let Ok(typed) = input.try_recv() {
                        if let Input::Line(text) = typed {
                            send_line(link, ctx, output, text).await?;
                        }
                    }
                    // Answer so the other side knows everything arrived.
                    let _ = timeout(BYE_TIMEOUT, link.send(&Chat::Bye)).await;
                    let _ = timeout(BYE_TIMEOUT, link.close()).await;
                    return Ok(ChatEnd::TheyLeft);
                }
                Some(Ok(msg)) => show(msg, ctx, output),
                Some(Err(e)) => return Err(lost(&ctx.their_name, &e)),
                None => return Err(lost(&ctx.their_name, "closed without a goodbye")),
            },
        }
    };
    send(link, Chat::Bye, &ctx.their_name).await?;
    // Lines the other side sent before it saw our goodbye still arrive and are shown.
    let answered = timeout(BYE_TIMEOUT, async {
        loop {
            match link.recv().await {
                Some(Ok(Chat::Bye)) => return Ok(()),
                Some(Ok(msg)) => show(msg, ctx, output),
                Some(Err(e)) => return Err(lost(&ctx.their_name, &e)),
                None => {
                    return Err(lost(
                        &ctx.their_name,
                        "closed before confirming our last lines",
                    ))
                }
            }
        }
    })
    .await;
    match answered {
        Ok(result) => result?,
        Err(_) => {
            return Err(PeerError::Timeout(format!(
                "{} did not answer our goodbye within {} s: delivery of the last lines is not confirmed",
                ctx.their_name,
                BYE_TIMEOUT.as_secs()
            )))
        }
    }
    let _ = timeout(BYE_TIMEOUT, link.close()).await;
    Ok(end)
}

/// Sends one typed line, or tells the user why not.
async fn send_line(
    link: &mut SecureLink,
    ctx: &mut ChatContext,
    output: &mut dyn Output,
    text: String,
) -> Result<(), PeerError> {
    if let Err(e) = validate_line(&text) {
        output.status(&format!("not sent: {e}"));
        return Ok(());
    }
    send(link, Chat::Line { text }, &ctx.their_name).await?;
    ctx.stats.sent += 1;
    Ok(())
}

/// Shows a received message other than the goodbye.
fn show(msg: Chat, ctx: &mut ChatContext, output: &mut dyn Output) {
    match msg {
        Chat::Line { text } => {
            ctx.stats.received += 1;
            output.incoming(&ctx.their_name, &text);
        }
        Chat::Nick { name } => match validate_name(&name) {
            Ok(()) => {
                let name = sanitize_for_terminal(&name);
                output.status(&format!("{} is now known as {name}", ctx.their_name));
                ctx.their_name = name;
            }
            Err(e) => output.status(&format!("{} sent an unusable name ({e})", ctx.their_name)),
        },
        Chat::Bye => {}
    }
}

/// What `/info` prints: the fixed facts, then the live numbers.
fn info_lines(link: &SecureLink, ctx: &ChatContext) -> Vec<String> {
    let mut lines: Vec<String> = ctx
        .facts
        .iter()
        .map(|(label, value)| format!("{label:<12} {value}"))
        .collect();
    let rtt = link.rtt().map_or("unknown".to_owned(), |d| {
        format!("{:.1} ms (the kernel's estimate)", d.as_secs_f64() * 1000.0)
    });
    lines.push(format!("{:<12} {rtt}", "rtt"));
    let (sent, received) = link.bytes();
    lines.push(format!(
        "{:<12} {} lines and {sent} bytes sent, {} lines and {received} bytes received (on the wire)",
        "traffic", ctx.stats.sent, ctx.stats.received
    ));
    lines.push(format!(
        "{:<12} you are {}, the other side is {}",
        "names", ctx.our_name, ctx.their_name
    ));
    lines
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
