//! The one place that maps a URL path to a (service, method), as micro's API does.
//!
//! | path               | service      | method    |
//! |--------------------|--------------|-----------|
//! | `/foo`             | `NS.foo`     | `Foo`     |
//! | `/foo/bar`         | `NS.foo`     | `Foo.Bar` |
//! | `/foo/bar/baz`     | `NS.foo`     | `Bar.Baz` |
//! | `/foo/bar/baz/cat` | `NS.foo.bar` | `Baz.Cat` |
//! | `/v1/foo/bar`      | `NS.v1.foo`  | `Foo.Bar` |
//! | `/v1/foo/bar/baz`  | `NS.v1.foo`  | `Bar.Baz` |
//!
//! `NS` is `--namespace`; when it is empty the service has no prefix. Path segments in
//! method names are camel-cased at dashes (`get-user` -> `GetUser`). The proxy handler
//! routes on the first segment only: `/foo/anything` -> `NS.foo`.

/// The service and method an rpc-handler path calls.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub service: String,
    pub method: String,
}

/// Maps an rpc-handler path; `None` for `/` or an empty path.
pub fn rpc_route(namespace: &str, path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let (service, method): (Vec<&str>, &[&str]) = match parts.len() {
        0 => return None,
        1 | 2 => (vec![parts[0]], &parts[..]),
        3 if is_version(parts[0]) => (parts[..2].to_vec(), &parts[1..]),
        n => (parts[..n - 2].to_vec(), &parts[n - 2..]),
    };
    Some(Route {
        service: qualify(namespace, &service.join(".")),
        method: method
            .iter()
            .map(|p| camel(p))
            .collect::<Vec<_>>()
            .join("."),
    })
}

/// The service a proxy-handler path goes to: the namespace and the first segment.
/// A call to a REST app by name with the name out of the path:
/// `/invoke/{service}/{path}` (or Dapr's `/v1.0/invoke/{service}/method/{path}`) is
/// `{service}` (qualified by the namespace) and the path the app gets,
/// `/{path}?{query}`. `None` for any other path.
pub fn invoke_route(namespace: &str, path_and_query: &str) -> Option<(String, String)> {
    let (rest, dapr) = match path_and_query.strip_prefix("/invoke/") {
        Some(rest) => (rest, false),
        None => (path_and_query.strip_prefix("/v1.0/invoke/")?, true),
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (service, mut tail) = rest.split_at(end);
    if service.is_empty() {
        return None;
    }
    if dapr {
        tail = tail.strip_prefix("/method")?;
        if !(tail.is_empty() || tail.starts_with('/') || tail.starts_with('?')) {
            return None;
        }
    }
    let path = if tail.starts_with('/') {
        tail.to_string()
    } else {
        format!("/{tail}")
    };
    Some((qualify(namespace, service), path))
}

pub fn proxy_service(namespace: &str, path: &str) -> Option<String> {
    let first = path.split('/').find(|p| !p.is_empty())?;
    Some(qualify(namespace, first))
}

fn qualify(namespace: &str, name: &str) -> String {
    if namespace.is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", namespace.trim_end_matches('.'))
    }
}

/// `v1`, `v2`, ... (micro's `^v[0-9]+$`).
fn is_version(segment: &str) -> bool {
    segment.len() > 1
        && segment.starts_with('v')
        && segment[1..].bytes().all(|b| b.is_ascii_digit())
}

/// `get-user` -> `GetUser`, `bar` -> `Bar`.
fn camel(segment: &str) -> String {
    segment
        .split('-')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_uppercase().chain(chars).collect(),
                None => String::new(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invoke_routes_take_the_name_out_of_the_path() {
        let r = |ns: &str, p: &str| invoke_route(ns, p);
        assert_eq!(
            r("", "/invoke/users/users/42?x=1"),
            Some(("users".into(), "/users/42?x=1".into()))
        );
        assert_eq!(r("", "/invoke/users"), Some(("users".into(), "/".into())));
        assert_eq!(
            r("", "/invoke/users?x=1"),
            Some(("users".into(), "/?x=1".into()))
        );
        assert_eq!(
            r("go.micro.srv", "/invoke/users/a"),
            Some(("go.micro.srv.users".into(), "/a".into()))
        );
        // Dapr's shape.
        assert_eq!(
            r("", "/v1.0/invoke/users/method/users/42"),
            Some(("users".into(), "/users/42".into()))
        );
        assert_eq!(
            r("", "/v1.0/invoke/users/method"),
            Some(("users".into(), "/".into()))
        );
        for not in [
            "/invoke/",
            "/invoke",
            "/users/42",
            "/v1.0/invoke/users/42",
            "/v1.0/invoke/users/methods/x",
            "/v1.0/invoke//method/x",
        ] {
            assert_eq!(r("", not), None, "{not}");
        }
    }

    #[test]
    fn the_micro_table() {
        let table = [
            ("go.micro.srv", "/foo/bar", "go.micro.srv.foo", "Foo.Bar"),
            (
                "go.micro.srv",
                "/foo/bar/baz",
                "go.micro.srv.foo",
                "Bar.Baz",
            ),
            (
                "go.micro.srv",
                "/foo/bar/baz/cat",
                "go.micro.srv.foo.bar",
                "Baz.Cat",
            ),
            (
                "go.micro.srv",
                "/v1/foo/bar",
                "go.micro.srv.v1.foo",
                "Foo.Bar",
            ),
            (
                "go.micro.srv",
                "/v1/foo/bar/baz",
                "go.micro.srv.v1.foo",
                "Bar.Baz",
            ),
            (
                "go.micro.srv",
                "/v2/foo/bar",
                "go.micro.srv.v2.foo",
                "Foo.Bar",
            ),
            (
                "go.micro.srv",
                "/v2/foo/bar/baz",
                "go.micro.srv.v2.foo",
                "Bar.Baz",
            ),
            ("", "/example/call", "example", "Example.Call"),
            ("", "/foo", "foo", "Foo"),
            ("", "/greeter/say-hello", "greeter", "Greeter.SayHello"),
            ("", "/vx/foo/bar", "vx", "Foo.Bar"),
            ("ns.", "//foo//bar/", "ns.foo", "Foo.Bar"),
        ];
        for (ns, path, service, method) in table {
            let route = rpc_route(ns, path).unwrap();
            assert_eq!(
                (route.service.as_str(), route.method.as_str()),
                (service, method),
                "{ns} {path}"
            );
        }
        assert_eq!(rpc_route("", "/"), None);
        assert_eq!(rpc_route("", ""), None);
    }

    #[test]
    fn proxy_routes_on_the_first_segment() {
        assert_eq!(proxy_service("", "/foo/a/b?c").as_deref(), Some("foo"));
        assert_eq!(
            proxy_service("go.micro.web", "/foo").as_deref(),
            Some("go.micro.web.foo")
        );
        assert_eq!(proxy_service("", "/"), None);
    }
}
