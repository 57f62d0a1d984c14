//! The browser-facing files on the public listener (PROTOCOL.md §5): the
//! dashboard page at `GET /` with its script and style sheet, and the
//! client module at `GET /v1/client.js`. They are embedded in the binary
//! (`assets/web/`), so a deployment is one file and the page always matches
//! the server it talks to.
//!
//! The files need no credentials: the page signs in itself (`/v1/sessions`)
//! and holds nothing secret. Every answer says `nosniff`; the page also gets
//! a Content-Security-Policy that allows only same-origin scripts, styles
//! and connections, so message data shown on it can never run as code, and
//! nothing is loaded from anywhere else.

use glommio::net::TcpStream;

use super::routes::{respond, respond_error, After, Request};

/// One embedded file.
struct Asset {
    /// The request path it answers.
    path: &'static str,
    /// Its `Content-Type`.
    content_type: &'static str,
    /// Its bytes.
    body: &'static [u8],
    /// Whether it is the page (it alone gets the CSP and framing rules).
    page: bool,
    /// Whether pages of any origin may load it (`Access-Control-Allow-Origin:
    /// *`): the client module is for users' own pages, and a module script
    /// from another origin needs CORS. It is public and carries no
    /// credentials, so this shares nothing.
    any_origin: bool,
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("../../assets/web/index.html"),
        page: true,
        any_origin: false,
    },
    Asset {
        path: "/dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/web/dashboard.js"),
        page: false,
        any_origin: false,
    },
    Asset {
        path: "/dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../../assets/web/dashboard.css"),
        page: false,
        any_origin: false,
    },
    Asset {
        path: "/v1/client.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../../assets/web/client.js"),
        page: false,
        any_origin: true,
    },
];

/// The methods the files are served to (their 405s' `Allow`).
pub const ALLOW: &str = "GET";

/// The paths served here, for the router.
pub fn is_asset_path(path: &str) -> bool {
    ASSETS.iter().any(|asset| asset.path == path)
}

/// Same-origin everything; `connect-src 'self'` covers the page's own
/// `ws:`/`wss:` origin (CSP Level 3).
const PAGE_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; \
     frame-ancestors 'none'";

/// Serves the embedded file at `request.path` (the router only sends paths
/// for which [`is_asset_path`] holds).
pub async fn serve(request: &Request, stream: &mut TcpStream) -> After {
    let Some(asset) = ASSETS.iter().find(|asset| asset.path == request.path) else {
        return respond_error(stream, 404, &[]).await;
    };
    if request.method != "GET" {
        return respond_error(stream, 405, &[("Allow", ALLOW)]).await;
    }
    // Revalidated on every load (cheap: a few tens of KiB on loopback or a
    // LAN), so an upgraded server never runs against a cached older page.
    const COMMON: [(&str, &str); 2] = [
        ("Cache-Control", "no-cache"),
        ("X-Content-Type-Options", "nosniff"),
    ];
    if asset.page {
        let headers = [
            COMMON[0],
            COMMON[1],
            ("Content-Security-Policy", PAGE_POLICY),
            ("Referrer-Policy", "no-referrer"),
            ("X-Frame-Options", "DENY"),
        ];
        respond(stream, 200, asset.content_type, &headers, asset.body).await
    } else if asset.any_origin {
        let headers = [COMMON[0], COMMON[1], ("Access-Control-Allow-Origin", "*")];
        respond(stream, 200, asset.content_type, &headers, asset.body).await
    } else {
        respond(stream, 200, asset.content_type, &COMMON, asset.body).await
    }
}

#[cfg(test)]
mod tests {
    use super::ASSETS;

    #[test]
    fn every_path_is_served_once_and_nothing_loads_from_elsewhere() {
        for (i, asset) in ASSETS.iter().enumerate() {
            assert!(ASSETS[i + 1..].iter().all(|other| other.path != asset.path));
            let text = std::str::from_utf8(asset.body).expect("assets are UTF-8");
            // No CDN, no external fonts: the page works on a closed network.
            assert!(
                !text.contains("https://"),
                "{} loads from elsewhere",
                asset.path
            );
            assert!(!text.contains("//cdn"), "{} loads from a CDN", asset.path);
        }
    }
}
