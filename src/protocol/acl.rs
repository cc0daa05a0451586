//! Initiator access lists: which initiator names and source networks may log in to the target.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address block, `10.0.0.0/8` or `fd00::/8` (a bare address is a /32 or /128).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AclError {
    #[error("{0:?} is not an address block like 10.0.0.0/8 or fd00::/8")]
    BadCidr(String),
    #[error("{0:?}: prefix length above {1}")]
    BadPrefix(String, u8),
}

impl FromStr for Cidr {
    type Err = AclError;

    fn from_str(s: &str) -> Result<Self, AclError> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| AclError::BadCidr(s.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p.trim().parse::<u8>().map_err(|_| AclError::BadCidr(s.to_string()))?,
        };
        if prefix > max {
            return Err(AclError::BadPrefix(s.to_string(), max));
        }
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl Cidr {
    /// Whether `ip` lies in this block; an IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`, as a
    /// dual-stack listener sees IPv4 clients) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Who may log in to the target; empty lists allow everyone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    /// Initiator names (compared case-insensitively, as iSCSI names are).
    pub initiators: Vec<String>,
    pub networks: Vec<Cidr>,
}

impl Acl {
    /// `Err(reason)` when the initiator or its address is not allowed.
    pub fn check(&self, initiator: &str, peer: Option<IpAddr>) -> Result<(), String> {
        if !self.initiators.is_empty() && !self.initiators.iter().any(|i| i.eq_ignore_ascii_case(initiator)) {
            return Err("initiator not in allowed_initiators".into());
        }
        if !self.networks.is_empty() {
            match peer {
                Some(ip) if self.networks.iter().any(|n| n.contains(ip)) => {}
                Some(ip) => return Err(format!("address {ip} not in allowed_networks")),
                None => return Err("address unknown, allowed_networks set".into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidr_parse_and_contains() {
        let n: Cidr = "10.0.0.0/8".parse().unwrap();
        assert!(n.contains(ip("10.255.1.2")));
        assert!(!n.contains(ip("11.0.0.1")));
        assert!(n.contains(ip("::ffff:10.1.2.3")));
        let one: Cidr = "127.0.0.1/32".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")) && !one.contains(ip("127.0.0.2")));
        assert_eq!("127.0.0.1".parse::<Cidr>().unwrap(), one);
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("192.0.2.1")) && !all.contains(ip("::1")));
        let v6: Cidr = "fd00::/8".parse().unwrap();
        assert!(v6.contains(ip("fd12::1")) && !v6.contains(ip("fe80::1")));
        assert!("::/0".parse::<Cidr>().unwrap().contains(ip("::1")));
        assert_eq!(n.to_string(), "10.0.0.0/8");
        assert!(matches!("10.0.0.0/33".parse::<Cidr>(), Err(AclError::BadPrefix(..))));
        for bad in ["", "10.0.0/8", "10.0.0.0/x", "host/8", "10.0.0.0/-1"] {
            assert!(matches!(bad.parse::<Cidr>(), Err(AclError::BadCidr(_))), "{bad}");
        }
    }

    #[test]
    fn acl_checks_names_and_networks() {
        let open = Acl::default();
        assert!(open.check("iqn.x:a", None).is_ok());
        let acl = Acl {
            initiators: vec!["iqn.2004-10.com.ubuntu:01:abcd".into()],
            networks: vec!["127.0.0.1/32".parse().unwrap()],
        };
        assert!(acl.check("iqn.2004-10.com.ubuntu:01:ABCD", Some(ip("127.0.0.1"))).is_ok());
        assert!(acl.check("iqn.2004-10.com.ubuntu:01:other", Some(ip("127.0.0.1"))).is_err());
        let e = acl.check("iqn.2004-10.com.ubuntu:01:abcd", Some(ip("127.0.0.2"))).unwrap_err();
        assert!(e.contains("127.0.0.2"), "{e}");
        assert!(acl.check("iqn.2004-10.com.ubuntu:01:abcd", None).is_err());
    }
}
