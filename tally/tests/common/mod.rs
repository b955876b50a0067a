//! What several of the `tally` binary's test programs share.

/// A GET of `path` on a service's listener at `port` of 127.0.0.1: its status and
/// body, whatever the status; `None` while nothing answers.
pub fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let response = ureq::get(&format!("http://127.0.0.1:{port}{path}"))
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .ok()?;
    let status = response.status().as_u16();
    Some((status, response.into_body().read_to_string().ok()?))
}

/// A port of 127.0.0.1 nothing listens on now, for a service to be told to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
