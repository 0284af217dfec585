//! Canonical JSON: the one byte encoding that is hashed anywhere in cusa-pipe.
//!
//! Object keys sorted (byte order), no whitespace, numbers as serde_json prints them. The
//! in-memory maps keep declaration order for messages (`preserve_order`); hashing must not
//! depend on it, so everything hashed goes through [`to_vec`].

use serde::Serialize;
use serde_json::Value;

/// Canonical bytes of any serialisable value.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let v = serde_json::to_value(value).expect("cusa-pipe's own types always serialise to JSON");
    let mut out = Vec::new();
    write(&sorted(&v), &mut out);
    out
}

fn sorted(v: &Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let mut out = serde_json::Map::new();
            for k in keys {
                out.insert(k.clone(), sorted(&map[k]));
            }
            Value::Object(out)
        }
        Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
        other => other.clone(),
    }
}

fn write(v: &Value, out: &mut Vec<u8>) {
    // With keys inserted in sorted order, serde_json's compact writer is canonical.
    serde_json::to_writer(out, v).expect("writing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    #[test]
    fn key_order_does_not_matter() {
        let a: serde_json::Value =
            serde_json::from_str(r#"{"b":1,"a":{"y":[1,{"d":2,"c":3}],"x":null}}"#).unwrap();
        let b: serde_json::Value =
            serde_json::from_str(r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#).unwrap();
        assert_eq!(super::to_vec(&a), super::to_vec(&b));
        assert_eq!(
            String::from_utf8(super::to_vec(&a)).unwrap(),
            r#"{"a":{"x":null,"y":[1,{"c":3,"d":2}]},"b":1}"#
        );
    }
}
