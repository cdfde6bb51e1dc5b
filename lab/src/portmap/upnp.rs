//! The responder's UPnP-IGD (v1) side: SSDP discovery, the device and service
//! descriptions, and SOAP control of one `WANIPConnection:1` service. Mappings
//! go into the responder's table like NAT-PMP and PCP ones.
//!
//! # Flow (as a client such as `igd-next` goes through it)
//!
//! 1. The client multicasts `M-SEARCH` to [`SSDP_GROUP`]:[`SSDP_PORT`] with a
//!    search target (`ST`). If the target is one we are (the root device, the
//!    `InternetGatewayDevice:1`, the `WANIPConnection:1` service, or
//!    `ssdp:all`), the SSDP thread answers unicast `HTTP/1.1 200 OK` with
//!    `LOCATION: http://<lan>:<UPNP_HTTP_PORT>/rootDesc.xml`, from the LAN
//!    address: clients trust a location only on the address that answered.
//! 2. The client fetches the device description ([`ROOT_PATH`]): the gateway
//!    device, its `WANDevice:1`, its `WANConnectionDevice:1`, whose service
//!    list names the `WANIPConnection:1` service with its description URL
//!    ([`SCPD_PATH`]) and control URL ([`CONTROL_PATH`]).
//! 3. The client fetches the service description, and learns from its action
//!    list which input arguments each action takes, in which order (`igd-next`
//!    sends exactly those).
//! 4. The client POSTs a SOAP envelope to the control URL, naming the action in
//!    the `SOAPAction` header (`"<service type>#<action>"`). A success is the
//!    `<action>Response` element; a failure is HTTP 500 with a SOAP fault whose
//!    detail carries the UPnP error code.
//!
//! Every HTTP answer closes the connection. Requests are bounded in size
//! ([`MAX_REQUEST`]), in time ([`REQUEST_DEADLINE`]) and in number
//! ([`MAX_CONNECTIONS`]); anything malformed gets an HTTP error or silence,
//! never a panic. Only hosts on the router's LAN are answered.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{
    apply, lock, timed_out, State, Via, EXPIRY_CHECK, MAX_LIFETIME, PERMANENT, SSDP_GROUP,
    SSDP_PORT, UPNP_HTTP_PORT,
};
use crate::error::{LabError, Result};
use crate::netns;

/// Path of the root device description.
pub(super) const ROOT_PATH: &str = "/rootDesc.xml";
/// Path of the `WANIPConnection:1` service description (SCPD).
pub(super) const SCPD_PATH: &str = "/WANIPCn.xml";
/// Path the SOAP actions are posted to.
pub(super) const CONTROL_PATH: &str = "/ctl/IPConn";

const ROOT_DEVICE: &str = "upnp:rootdevice";
const GATEWAY_DEVICE: &str = "urn:schemas-upnp-org:device:InternetGatewayDevice:1";
const WAN_DEVICE: &str = "urn:schemas-upnp-org:device:WANDevice:1";
const WAN_CONNECTION_DEVICE: &str = "urn:schemas-upnp-org:device:WANConnectionDevice:1";
const SERVICE: &str = "urn:schemas-upnp-org:service:WANIPConnection:1";

/// What the responder calls itself in SSDP and HTTP answers.
const SERVER: &str = concat!("Linux UPnP/1.0 punchline-lab/", env!("CARGO_PKG_VERSION"));

/// Largest HTTP request (head and body) read. A SOAP request is well under
/// 2 KiB; this leaves room for any honest client and bounds a dishonest one.
pub(super) const MAX_REQUEST: usize = 64 * 1024;

/// How long a client has to send its whole request: a request arrives in one
/// or two segments on a LAN, so only a stalled or hostile client hits this.
pub(super) const REQUEST_DEADLINE: Duration = Duration::from_secs(5);

/// Connections served at once; more are closed unanswered. A client makes one
/// at a time.
pub(super) const MAX_CONNECTIONS: usize = 16;

/// How long one blocking read of a connection lasts before its thread looks at
/// the stop flag and the deadline again: short, so stopping is prompt.
const READ_POLL: Duration = Duration::from_millis(200);

/// How long an answer may take to write before the connection is given up.
const WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the accept loop waits for a connection before it looks at the
/// stop flag again (in milliseconds). A connection wakes it at once: a router
/// answers without delay, and the peer's mapping should be granted before
/// its hello goes, as with a real one.
const ACCEPT_POLL_MS: u16 = 200;

/// The SSDP socket (`0.0.0.0:SSDP_PORT`, in the SSDP group on the LAN
/// address) and the HTTP listener (`lan:UPNP_HTTP_PORT`), inside `netns`.
pub(super) fn bind(netns: &str, lan: Ipv4Addr) -> Result<(UdpSocket, TcpListener)> {
    netns::run_in(netns, || -> std::io::Result<(UdpSocket, TcpListener)> {
        use socket2::{Domain, Protocol, Socket, Type};
        let ssdp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        // Other SSDP programs on a router share the port the same way.
        ssdp.set_reuse_address(true)?;
        ssdp.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, SSDP_PORT)).into())?;
        // Joined on the LAN interface only: searches from the WAN side are not
        // even received.
        ssdp.join_multicast_v4(&SSDP_GROUP, &lan)?;
        ssdp.set_read_timeout(Some(EXPIRY_CHECK))?;
        let http = TcpListener::bind((lan, UPNP_HTTP_PORT))?;
        http.set_nonblocking(true)?;
        Ok((ssdp.into(), http))
    })?
    .map_err(|source| LabError::Io {
        what: format!(
            "binding the UPnP responder (SSDP *:{SSDP_PORT}, HTTP {lan}:{UPNP_HTTP_PORT})"
        ),
        source,
    })
}

/// Whether `ip` is on the router's LAN. The lab's LANs behind a NAT router
/// are /24s (see [`crate::topology`]).
fn on_lan(lan: Ipv4Addr, ip: Ipv4Addr) -> bool {
    lan.octets()[..3] == ip.octets()[..3]
}

/// The unique device name of the root device (`n` = 0), the WAN device (1)
/// or the WAN connection device (2): fixed per router, from its addresses.
fn udn(state: &State, n: u8) -> String {
    let [w0, w1, w2, w3] = state.wan.octets();
    let [l0, l1, l2, l3] = state.lan.octets();
    format!("uuid:9e4c2b1a-{w0:02x}{w1:02x}-4{n:03x}-8000-{w2:02x}{w3:02x}{l0:02x}{l1:02x}{l2:02x}{l3:02x}")
}

// ---- SSDP ----------------------------------------------------------------

/// Answers SSDP searches until the responder stops.
pub(super) fn serve_ssdp(state: &State, socket: &UdpSocket) -> Result<()> {
    // A search is one datagram of a few hundred bytes; more is not a search.
    let mut buf = [0u8; 2048];
    while !state.stop.load(Ordering::Relaxed) {
        let (len, from) = match socket.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e) if timed_out(&e) => continue,
            Err(source) => {
                return Err(LabError::Io {
                    what: "the UPnP responder's SSDP socket".into(),
                    source,
                })
            }
        };
        let SocketAddr::V4(from) = from else { continue };
        if !on_lan(state.lan, *from.ip()) {
            continue;
        }
        let targets = search_targets(&buf[..len]);
        tracing::debug!(%from, ?targets, "lab: SSDP search");
        // The reply leaves from the LAN address: the route back to a LAN host
        // is the LAN link, whose address is the kernel's source for it.
        // (Real devices wait up to MX seconds at random to spread the replies
        // of many devices; the lab has one.)
        let multicast = std::str::from_utf8(&buf[..len])
            .is_ok_and(|text| text.contains(&SSDP_GROUP.to_string()));
        let delay = state.search_delay_ms.load(Ordering::Relaxed);
        if multicast && delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        for target in targets {
            let _ = socket.send_to(search_answer(state, target).as_bytes(), from);
        }
    }
    Ok(())
}

/// The search targets an SSDP datagram asks for that we answer as, or none
/// when it is not a well-formed `M-SEARCH` (a response, a NOTIFY, garbage).
pub(super) fn search_targets(datagram: &[u8]) -> Vec<&'static str> {
    const OURS: [&str; 3] = [ROOT_DEVICE, GATEWAY_DEVICE, SERVICE];
    let Ok(text) = std::str::from_utf8(datagram) else {
        return Vec::new();
    };
    let mut lines = text.split("\r\n");
    if lines.next().map(str::trim) != Some("M-SEARCH * HTTP/1.1") {
        return Vec::new();
    }
    let (mut man, mut st) = (None, None);
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("MAN") {
            man = Some(value);
        } else if name.trim().eq_ignore_ascii_case("ST") {
            st = Some(value);
        }
    }
    if man.map(|m| m.trim_matches('"')) != Some("ssdp:discover") {
        return Vec::new();
    }
    match st {
        Some("ssdp:all") => OURS.to_vec(),
        Some(st) => OURS.into_iter().filter(|&t| t == st).collect(),
        None => Vec::new(),
    }
}

/// The unicast answer to a search for `target`.
fn search_answer(state: &State, target: &str) -> String {
    let usn = match target {
        ROOT_DEVICE => format!("{}::{ROOT_DEVICE}", udn(state, 0)),
        GATEWAY_DEVICE => format!("{}::{GATEWAY_DEVICE}", udn(state, 0)),
        _ => format!("{}::{target}", udn(state, 2)),
    };
    format!(
        "HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\nLOCATION: http://{}:{UPNP_HTTP_PORT}{ROOT_PATH}\r\nSERVER: {SERVER}\r\nST: {target}\r\nUSN: {usn}\r\n\r\n",
        state.lan
    )
}

// ---- HTTP ----------------------------------------------------------------

/// Serves HTTP on `listener` until the responder stops, one thread per
/// connection; returns when every connection thread has ended.
pub(super) fn serve_http(state: &State, listener: &TcpListener) -> Result<()> {
    std::thread::scope(|scope| {
        let mut connections = Vec::new();
        while !state.stop.load(Ordering::Relaxed) {
            let (stream, from) = match listener.accept() {
                Ok(accepted) => accepted,
                Err(e) if timed_out(&e) => {
                    wait_readable(listener);
                    continue;
                }
                // An aborted connection or a lack of descriptors ends one
                // connection, never the server.
                Err(e) => {
                    tracing::debug!(error = %e, "lab: UPnP HTTP accept");
                    std::thread::sleep(Duration::from_millis(ACCEPT_POLL_MS.into()));
                    continue;
                }
            };
            connections.retain(|c: &std::thread::ScopedJoinHandle<'_, ()>| !c.is_finished());
            let SocketAddr::V4(from) = from else { continue };
            if !on_lan(state.lan, *from.ip()) || connections.len() >= MAX_CONNECTIONS {
                continue;
            }
            let spawned = std::thread::Builder::new()
                .name("portmap-http-conn".into())
                .spawn_scoped(scope, move || connection(state, stream, *from.ip()));
            match spawned {
                Ok(c) => connections.push(c),
                Err(e) => tracing::warn!(error = %e, "lab: UPnP HTTP connection thread"),
            }
        }
    });
    Ok(())
}

/// Waits until `listener` has a connection to accept, or [`ACCEPT_POLL_MS`].
fn wait_readable(listener: &TcpListener) {
    use nix::poll::{poll, PollFd, PollFlags};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    let _ = poll(&mut fds, ACCEPT_POLL_MS);
}

/// Reads one request from `client` and answers it, within the limits.
fn connection(state: &State, mut stream: TcpStream, client: Ipv4Addr) {
    if stream.set_nonblocking(false).is_err()
        || stream.set_read_timeout(Some(READ_POLL)).is_err()
        || stream.set_write_timeout(Some(WRITE_TIMEOUT)).is_err()
    {
        return;
    }
    let deadline = Instant::now() + REQUEST_DEADLINE;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let answer = loop {
        match parse_request(&buf) {
            Parsed::Done(request) => break handle(state, client, &request),
            Parsed::Bad(status) => break page(status),
            Parsed::Incomplete => {}
        }
        if state.stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return;
        }
        match stream.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if timed_out(&e) => {}
            Err(_) => return,
        }
    };
    let _ = stream.write_all(&answer);
    let _ = stream.shutdown(Shutdown::Write);
}

/// An HTTP status: code and reason phrase.
type Status = (u16, &'static str);

const OK: Status = (200, "OK");
const BAD_REQUEST: Status = (400, "Bad Request");
const NOT_FOUND: Status = (404, "Not Found");
const METHOD_NOT_ALLOWED: Status = (405, "Method Not Allowed");
const TOO_LARGE: Status = (413, "Content Too Large");
const HEADERS_TOO_LARGE: Status = (431, "Request Header Fields Too Large");
const INTERNAL_ERROR: Status = (500, "Internal Server Error");
const NOT_IMPLEMENTED: Status = (501, "Not Implemented");
const VERSION_NOT_SUPPORTED: Status = (505, "HTTP Version Not Supported");

/// One HTTP request, borrowed from the bytes read.
#[derive(Debug)]
pub(super) struct Request<'a> {
    method: &'a str,
    path: &'a str,
    headers: Vec<(&'a str, &'a str)>,
    body: &'a [u8],
}

impl Request<'_> {
    /// The value of header `name` (case-insensitive), if present.
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// What the bytes read so far make.
#[derive(Debug)]
pub(super) enum Parsed<'a> {
    /// A whole request.
    Done(Request<'a>),
    /// Not yet a whole request; read more.
    Incomplete,
    /// Never a request we serve: answer with this status and close.
    Bad(Status),
}

/// Parses an HTTP/1.x request with an optional `Content-Length` body.
pub(super) fn parse_request(buf: &[u8]) -> Parsed<'_> {
    let Some(head_len) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return if buf.len() >= MAX_REQUEST {
            Parsed::Bad(HEADERS_TOO_LARGE)
        } else {
            Parsed::Incomplete
        };
    };
    let Ok(head) = std::str::from_utf8(&buf[..head_len]) else {
        return Parsed::Bad(BAD_REQUEST);
    };
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let (Some(method), Some(path), Some(version), None) = (
        request_line.next(),
        request_line.next(),
        request_line.next(),
        request_line.next(),
    ) else {
        return Parsed::Bad(BAD_REQUEST);
    };
    if method.is_empty() || !path.starts_with('/') {
        return Parsed::Bad(BAD_REQUEST);
    }
    if !version.starts_with("HTTP/1.") {
        return Parsed::Bad(VERSION_NOT_SUPPORTED);
    }
    let mut headers = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Parsed::Bad(BAD_REQUEST);
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Parsed::Bad(BAD_REQUEST);
        }
        headers.push((name, value.trim()));
    }
    let mut request = Request {
        method,
        path,
        headers,
        body: &[],
    };
    if request.header("Transfer-Encoding").is_some() {
        return Parsed::Bad(NOT_IMPLEMENTED);
    }
    let length = match request.header("Content-Length").map(str::parse::<usize>) {
        None => 0,
        Some(Ok(length)) => length,
        Some(Err(_)) => return Parsed::Bad(BAD_REQUEST),
    };
    let body_start = head_len + 4;
    if length > MAX_REQUEST - body_start.min(MAX_REQUEST) {
        return Parsed::Bad(TOO_LARGE);
    }
    match buf.get(body_start..body_start + length) {
        Some(body) => {
            request.body = body;
            Parsed::Done(request)
        }
        None => Parsed::Incomplete,
    }
}

/// The whole HTTP answer (`Connection: close`) with an XML body.
fn answer(status: Status, body: &str) -> Vec<u8> {
    let (code, reason) = status;
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/xml; charset=\"utf-8\"\r\nContent-Length: {}\r\nConnection: close\r\nServer: {SERVER}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An HTTP error answer.
fn page(status: Status) -> Vec<u8> {
    let (code, reason) = status;
    answer(status, &format!("<error>{code} {reason}</error>\n"))
}

/// The answer to a whole request from `client`.
fn handle(state: &State, client: Ipv4Addr, request: &Request<'_>) -> Vec<u8> {
    tracing::debug!(%client, method = request.method, path = request.path, "lab: UPnP HTTP");
    let path = request.path.split('?').next().unwrap_or_default();
    match (request.method, path) {
        ("GET", ROOT_PATH) => answer(OK, &root_description(state)),
        ("GET", SCPD_PATH) => answer(OK, &service_description()),
        ("POST", CONTROL_PATH) => {
            let action = request
                .header("SOAPAction")
                .map(|v| v.trim().trim_matches('"'))
                .and_then(|v| v.split_once('#'))
                .filter(|(service, _)| *service == SERVICE)
                .map(|(_, action)| action);
            let body = String::from_utf8_lossy(request.body);
            match action.map(|a| control(state, client, a, &body)) {
                Some(Ok(ok)) => answer(OK, &ok),
                Some(Err(fault)) => answer(INTERNAL_ERROR, &soap_fault(fault)),
                None => answer(INTERNAL_ERROR, &soap_fault(INVALID_ACTION)),
            }
        }
        (_, ROOT_PATH | SCPD_PATH | CONTROL_PATH) => page(METHOD_NOT_ALLOWED),
        _ => page(NOT_FOUND),
    }
}

// ---- Descriptions -------------------------------------------------------

/// The root device description: gateway → WAN device → WAN connection device
/// → `WANIPConnection:1`, with relative URLs (no `URLBase`: they resolve
/// against the description's own URL).
fn root_description(state: &State) -> String {
    let (root, wan, conn) = (udn(state, 0), udn(state, 1), udn(state, 2));
    format!(
        r#"<?xml version="1.0"?>
<root xmlns="urn:schemas-upnp-org:device-1-0">
<specVersion><major>1</major><minor>0</minor></specVersion>
<device>
<deviceType>{GATEWAY_DEVICE}</deviceType>
<friendlyName>punchline lab router</friendlyName>
<manufacturer>punchline</manufacturer>
<modelName>punchline-lab port-mapping router</modelName>
<UDN>{root}</UDN>
<deviceList>
<device>
<deviceType>{WAN_DEVICE}</deviceType>
<friendlyName>WAN device</friendlyName>
<manufacturer>punchline</manufacturer>
<modelName>punchline-lab port-mapping router</modelName>
<UDN>{wan}</UDN>
<deviceList>
<device>
<deviceType>{WAN_CONNECTION_DEVICE}</deviceType>
<friendlyName>WAN connection device</friendlyName>
<manufacturer>punchline</manufacturer>
<modelName>punchline-lab port-mapping router</modelName>
<UDN>{conn}</UDN>
<serviceList>
<service>
<serviceType>{SERVICE}</serviceType>
<serviceId>urn:upnp-org:serviceId:WANIPConn1</serviceId>
<SCPDURL>{SCPD_PATH}</SCPDURL>
<controlURL>{CONTROL_PATH}</controlURL>
<eventSubURL>/evt/IPConn</eventSubURL>
</service>
</serviceList>
</device>
</deviceList>
</device>
</deviceList>
</device>
</root>
"#
    )
}

/// One argument of an action: name, direction (`in`, `out`), related state
/// variable.
type Argument = (&'static str, &'static str, &'static str);

/// The actions of the service: name, then its arguments in the order of the
/// IGD v1 specification.
const ACTIONS: &[(&str, &[Argument])] = &[
    (
        "AddPortMapping",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
            ("NewInternalPort", "in", "InternalPort"),
            ("NewInternalClient", "in", "InternalClient"),
            ("NewEnabled", "in", "PortMappingEnabled"),
            ("NewPortMappingDescription", "in", "PortMappingDescription"),
            ("NewLeaseDuration", "in", "PortMappingLeaseDuration"),
        ],
    ),
    (
        "DeletePortMapping",
        &[
            ("NewRemoteHost", "in", "RemoteHost"),
            ("NewExternalPort", "in", "ExternalPort"),
            ("NewProtocol", "in", "PortMappingProtocol"),
        ],
    ),
    (
        "GetExternalIPAddress",
        &[("NewExternalIPAddress", "out", "ExternalIPAddress")],
    ),
];

/// The state variables the arguments relate to, with their types.
const STATE_VARIABLES: &[(&str, &str)] = &[
    ("ExternalIPAddress", "string"),
    ("RemoteHost", "string"),
    ("ExternalPort", "ui2"),
    ("PortMappingProtocol", "string"),
    ("InternalPort", "ui2"),
    ("InternalClient", "string"),
    ("PortMappingEnabled", "boolean"),
    ("PortMappingDescription", "string"),
    ("PortMappingLeaseDuration", "ui4"),
];

/// The `WANIPConnection:1` service description (SCPD).
fn service_description() -> String {
    let mut text = String::from(
        "<?xml version=\"1.0\"?>\n<scpd xmlns=\"urn:schemas-upnp-org:service-1-0\">\n\
         <specVersion><major>1</major><minor>0</minor></specVersion>\n<actionList>\n",
    );
    for (name, arguments) in ACTIONS {
        text.push_str(&format!("<action><name>{name}</name><argumentList>\n"));
        for (argument, direction, variable) in *arguments {
            text.push_str(&format!(
                "<argument><name>{argument}</name><direction>{direction}</direction><relatedStateVariable>{variable}</relatedStateVariable></argument>\n"
            ));
        }
        text.push_str("</argumentList></action>\n");
    }
    text.push_str("</actionList>\n<serviceStateTable>\n");
    for (name, kind) in STATE_VARIABLES {
        text.push_str(&format!(
            "<stateVariable sendEvents=\"no\"><name>{name}</name><dataType>{kind}</dataType></stateVariable>\n"
        ));
    }
    text.push_str("</serviceStateTable>\n</scpd>\n");
    text
}

// ---- SOAP control -------------------------------------------------------

/// A UPnP error: code and description (UPnP Device Architecture 1.0 section
/// 3.2.2, IGD v1 `WANIPConnection` section 2.4).
type Fault = (u16, &'static str);

const INVALID_ACTION: Fault = (401, "Invalid Action");
const INVALID_ARGS: Fault = (402, "Invalid Args");
const NOT_AUTHORIZED: Fault = (606, "Action not authorized");
const NO_SUCH_ENTRY: Fault = (714, "NoSuchEntryInArray");
const WILDCARD_EXTERNAL_PORT: Fault = (716, "WildCardNotPermittedInExtPort");
const CONFLICT: Fault = (718, "ConflictInMappingEntry");
const ONLY_PERMANENT: Fault = (725, "OnlyPermanentLeasesSupported");
const REMOTE_HOST_WILDCARD_ONLY: Fault = (726, "RemoteHostOnlySupportsWildcard");

/// A SOAP envelope around `body`.
fn envelope(body: &str) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\" s:encodingStyle=\"http://schemas.xmlsoap.org/soap/encoding/\">\n<s:Body>\n{body}\n</s:Body>\n</s:Envelope>\n"
    )
}

/// A SOAP fault carrying UPnP error `fault`.
fn soap_fault((code, description): Fault) -> String {
    envelope(&format!(
        "<s:Fault>\n<faultcode>s:Client</faultcode>\n<faultstring>UPnPError</faultstring>\n<detail>\n<UPnPError xmlns=\"urn:schemas-upnp-org:control-1-0\">\n<errorCode>{code}</errorCode>\n<errorDescription>{description}</errorDescription>\n</UPnPError>\n</detail>\n</s:Fault>"
    ))
}

/// Runs SOAP action `action` for `client`: the response envelope, or the
/// fault to answer with.
fn control(
    state: &State,
    client: Ipv4Addr,
    action: &str,
    body: &str,
) -> std::result::Result<String, Fault> {
    let delay = state.action_delay_ms.load(Ordering::Relaxed);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    let out = match action {
        "AddPortMapping" => add_port_mapping(state, client, body)?,
        "DeletePortMapping" => delete_port_mapping(state, client, body)?,
        "GetExternalIPAddress" => {
            format!("<NewExternalIPAddress>{}</NewExternalIPAddress>", state.wan)
        }
        _ => return Err(INVALID_ACTION),
    };
    tracing::debug!(%client, action, "lab: UPnP action done");
    Ok(envelope(&format!(
        "<u:{action}Response xmlns:u=\"{SERVICE}\">{out}</u:{action}Response>"
    )))
}

/// The text of the first element named `name` (any namespace prefix) in
/// `body`, trimmed; `""` for an empty element. A lenient reading of the few
/// flat argument elements a SOAP request carries, not an XML parser.
pub(super) fn arg<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let mut from = 0;
    while let Some(at) = body.get(from..)?.find('<') {
        let start = from + at + 1;
        let rest = &body[start..];
        let tag_end = rest
            .find(|c: char| c == '>' || c == '/' || c.is_whitespace())
            .unwrap_or(rest.len());
        let tag = &rest[..tag_end];
        if tag.rsplit(':').next() == Some(name) {
            let close = rest.find('>')?;
            if rest[..close].ends_with('/') {
                return Some("");
            }
            let content = &rest[close + 1..];
            return Some(content[..content.find("</")?].trim());
        }
        from = start;
    }
    None
}

/// Argument `name` parsed, or Invalid Args.
fn parsed<T: std::str::FromStr>(body: &str, name: &str) -> std::result::Result<T, Fault> {
    arg(body, name)
        .and_then(|v| v.parse().ok())
        .ok_or(INVALID_ARGS)
}

/// `AddPortMapping`: maps `NewExternalPort` on the WAN address to the
/// client's `NewInternalPort`, or renews that mapping.
fn add_port_mapping(
    state: &State,
    client: Ipv4Addr,
    body: &str,
) -> std::result::Result<String, Fault> {
    if !arg(body, "NewRemoteHost").unwrap_or_default().is_empty() {
        return Err(REMOTE_HOST_WILDCARD_ONLY);
    }
    let external: u16 = parsed(body, "NewExternalPort")?;
    // Only TCP mappings are made (the lab forwards TCP only).
    if !arg(body, "NewProtocol").is_some_and(|p| p.eq_ignore_ascii_case("TCP")) {
        return Err(INVALID_ARGS);
    }
    let internal: u16 = parsed(body, "NewInternalPort")?;
    let internal_client: Ipv4Addr = parsed(body, "NewInternalClient")?;
    // A disabled entry would only be listed, never forwarded: not kept.
    if !matches!(arg(body, "NewEnabled"), Some("1" | "true" | "yes")) {
        return Err(INVALID_ARGS);
    }
    let lease: u32 = parsed(body, "NewLeaseDuration")?;
    if internal == 0 {
        return Err(INVALID_ARGS);
    }
    // A host maps only to itself, as miniupnpd's default ("secure mode").
    if internal_client != client {
        return Err(NOT_AUTHORIZED);
    }
    if external == 0 {
        return Err(WILDCARD_EXTERNAL_PORT);
    }
    if lease != 0 && state.only_permanent.load(Ordering::Relaxed) {
        return Err(ONLY_PERMANENT);
    }
    let now = Instant::now();
    let lasts = match lease {
        0 => PERMANENT,
        _ => Duration::from_secs(lease.min(MAX_LIFETIME).into()),
    };
    let host = SocketAddr::new(IpAddr::V4(client), internal);
    let mut mappings = lock(&state.mappings);
    // An entry past its lifetime that the expiry has not yet removed is free.
    let live = |g: &super::Granted| g.expires > now;
    if mappings
        .get(&external)
        .is_some_and(|g| live(g) && g.internal != host)
    {
        return Err(CONFLICT);
    }
    // One mapping per internal address and port, as with NAT-PMP and PCP.
    if mappings
        .iter()
        .any(|(&port, g)| port != external && live(g) && g.internal == host)
    {
        return Err(CONFLICT);
    }
    mappings.insert(
        external,
        super::Granted {
            internal: host,
            external: SocketAddr::new(IpAddr::V4(state.wan), external),
            via: Via::Upnp,
            expires: now.checked_add(lasts).unwrap_or(now + PERMANENT / 10),
        },
    );
    drop(mappings);
    apply(state);
    Ok(String::new())
}

/// `DeletePortMapping`: removes the client's mapping of `NewExternalPort`.
fn delete_port_mapping(
    state: &State,
    client: Ipv4Addr,
    body: &str,
) -> std::result::Result<String, Fault> {
    let external: u16 = parsed(body, "NewExternalPort")?;
    let protocol = arg(body, "NewProtocol").ok_or(INVALID_ARGS)?;
    let remote = arg(body, "NewRemoteHost").unwrap_or_default();
    // Only wildcard-remote TCP entries exist.
    if !protocol.eq_ignore_ascii_case("TCP") || !remote.is_empty() {
        return Err(NO_SUCH_ENTRY);
    }
    let now = Instant::now();
    let mut mappings = lock(&state.mappings);
    match mappings.get(&external) {
        Some(g) if g.expires > now => {
            if g.internal.ip() != IpAddr::V4(client) {
                return Err(NOT_AUTHORIZED);
            }
        }
        _ => return Err(NO_SUCH_ENTRY),
    }
    mappings.remove(&external);
    drop(mappings);
    apply(state);
    Ok(String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_whole_request_is_parsed_with_its_body() {
        let req =
            b"POST /ctl/IPConn HTTP/1.1\r\nsoapaction: \"x#y\"\r\ncontent-length: 4\r\n\r\nbody";
        let Parsed::Done(r) = parse_request(req) else {
            panic!("not parsed")
        };
        assert_eq!(
            (r.method, r.path, r.body),
            ("POST", "/ctl/IPConn", &b"body"[..])
        );
        assert_eq!(r.header("SOAPAction"), Some("\"x#y\""));
        // Every prefix is incomplete.
        for end in 0..req.len() {
            assert!(
                matches!(parse_request(&req[..end]), Parsed::Incomplete),
                "{end}"
            );
        }
    }

    #[test]
    fn malformed_or_oversized_requests_are_refused() {
        for (req, code) in [
            (&b"GET\r\n\r\n"[..], 400),
            (b"GET rootDesc.xml HTTP/1.1\r\n\r\n", 400),
            (b"GET / HTTP/2\r\n\r\n", 505),
            (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", 400),
            (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
                400,
            ),
            (b"POST / HTTP/1.1\r\nContent-Length: 70000\r\n\r\n", 413),
            (
                b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
                501,
            ),
            (b"GET / HTTP/1.1\r\nX: \xff\r\n\r\n", 400),
        ] {
            match parse_request(req) {
                Parsed::Bad((c, _)) => assert_eq!(c, code, "{}", String::from_utf8_lossy(req)),
                other => panic!("{}: {other:?}", String::from_utf8_lossy(req)),
            }
        }
        let huge = vec![b'a'; MAX_REQUEST];
        assert!(matches!(parse_request(&huge), Parsed::Bad((431, _))));
    }

    #[test]
    fn arguments_are_found_with_or_without_prefix() {
        let body = "<s:Body><u:AddPortMapping xmlns:u=\"x\"><NewRemoteHost></NewRemoteHost>\n\
                    <NewExternalPort> 40000 </NewExternalPort><NewRemoteHostX>1</NewRemoteHostX>\
                    <m:NewProtocol>TCP</m:NewProtocol><NewEnabled/></u:AddPortMapping>";
        assert_eq!(arg(body, "NewRemoteHost"), Some(""));
        assert_eq!(arg(body, "NewExternalPort"), Some("40000"));
        assert_eq!(arg(body, "NewRemoteHostX"), Some("1"));
        assert_eq!(arg(body, "NewProtocol"), Some("TCP"));
        assert_eq!(arg(body, "NewEnabled"), Some(""));
        assert_eq!(arg(body, "NewLeaseDuration"), None);
        assert_eq!(arg("<NewExternalPort>1", "NewExternalPort"), None);
        assert_eq!(arg("<NewExternalPort", "NewExternalPort"), None);
    }

    #[test]
    fn searches_for_what_we_are_are_answered() {
        let search = |st: &str| {
            format!("M-SEARCH * HTTP/1.1\r\nHost:239.255.255.250:1900\r\nST:{st}\r\nMan:\"ssdp:discover\"\r\nMX:3\r\n\r\n")
        };
        assert_eq!(search_targets(search(SERVICE).as_bytes()), vec![SERVICE]);
        assert_eq!(
            search_targets(search(GATEWAY_DEVICE).as_bytes()),
            vec![GATEWAY_DEVICE]
        );
        assert_eq!(search_targets(search("ssdp:all").as_bytes()).len(), 3);
        assert!(search_targets(
            search("urn:schemas-upnp-org:service:WANPPPConnection:1").as_bytes()
        )
        .is_empty());
        // A response, a search without MAN, garbage: silence.
        assert!(search_targets(b"HTTP/1.1 200 OK\r\nST: ssdp:all\r\n\r\n").is_empty());
        assert!(search_targets(b"M-SEARCH * HTTP/1.1\r\nST: ssdp:all\r\n\r\n").is_empty());
        assert!(search_targets(b"\xff\xfe").is_empty());
    }

    #[test]
    fn decoding_garbage_never_panics() {
        let mut rng = fastrand::Rng::with_seed(7);
        let pieces: [&[u8]; 10] = [
            b"GET ",
            b"POST /ctl/IPConn HTTP/1.1\r\n",
            b"\r\n",
            b":",
            b"Content-Length: 3\r\n",
            b"<NewExternalPort>",
            b"</",
            b"M-SEARCH * HTTP/1.1\r\n",
            b"ST: ssdp:all\r\nMAN: \"ssdp:discover\"\r\n",
            b"\xc3",
        ];
        for _ in 0..5000 {
            let mut input = Vec::new();
            for _ in 0..rng.usize(0..12) {
                if rng.bool() {
                    input.extend_from_slice(pieces[rng.usize(..pieces.len())]);
                } else {
                    input.push(rng.u8(..));
                }
            }
            let _ = parse_request(&input);
            let _ = search_targets(&input);
            let text = String::from_utf8_lossy(&input);
            let _ = arg(&text, "NewExternalPort");
        }
    }
}
