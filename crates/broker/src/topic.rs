//! Topic names follow NATS subject rules, whichever backend runs, so an app can move
//! from the embedded broker to NATS unchanged: tokens separated by `.`, none empty, no
//! whitespace. Subscriptions may use `*` for one whole token and `>` for the rest.

/// Checks a topic to publish to (no wildcards).
pub fn check_publish(topic: &str) -> Result<(), String> {
    check(topic, false)
}

/// Checks a subscription pattern (wildcards allowed).
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    check(pattern, true)
}

fn check(topic: &str, wildcards: bool) -> Result<(), String> {
    let what = if wildcards {
        "subscription topic"
    } else {
        "topic"
    };
    if topic.is_empty() {
        return Err(format!("{what} is missing: add ?topic=NAME"));
    }
    if topic.len() > 256 {
        return Err(format!("{what} is longer than 256 characters"));
    }
    let tokens: Vec<&str> = topic.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!(
                "{what} {topic:?} has an empty token (two dots, or a dot at an end)"
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("{what} {topic:?} contains whitespace"));
        }
        let wild = *token == "*" || *token == ">";
        if !wild && (token.contains('*') || token.contains('>')) {
            return Err(format!(
                "{what} {topic:?}: '*' and '>' must be whole tokens"
            ));
        }
        if wild && !wildcards {
            return Err(format!(
                "topic {topic:?}: wildcards are for subscribing; publish to a full name"
            ));
        }
        if *token == ">" && i != tokens.len() - 1 {
            return Err(format!("{what} {topic:?}: '>' may only be the last token"));
        }
    }
    Ok(())
}

/// Checks a queue group name: letters, digits, `-` and `_`.
pub fn check_queue(queue: &str) -> Result<(), String> {
    if queue.is_empty()
        || queue.len() > 64
        || !queue
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "queue {queue:?} must be 1 to 64 letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// Whether `topic` matches `pattern` (`*` one token, `>` one or more).
pub fn matches(pattern: &str, topic: &str) -> bool {
    let mut p = pattern.split('.');
    let mut t = topic.split('.');
    loop {
        match (p.next(), t.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_rules() {
        for ok in ["foo", "orders.new", "events.users.created", "a-b_c.D1"] {
            assert!(check_publish(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "foo bar", "foo..bar", ".foo", "foo.", "orders.*", "events.>", "a*b",
        ] {
            assert!(check_publish(bad).is_err(), "{bad}");
        }
        for ok in ["orders.*", "events.>", "*.created", "foo"] {
            assert!(check_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["events.>.x", "a*", "foo bar"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
        assert!(check_queue("group-1").is_ok());
        assert!(check_queue("a.b").is_err() && check_queue("").is_err());
    }

    #[test]
    fn wildcard_matching() {
        assert!(matches("foo", "foo"));
        assert!(!matches("foo", "foo.bar"));
        assert!(matches("orders.*", "orders.new"));
        assert!(!matches("orders.*", "orders.new.eu"));
        assert!(matches("events.>", "events.users.created"));
        assert!(!matches("events.>", "events"));
        assert!(matches("*.created", "users.created"));
    }
}
