//! CRC32C header and data digests (RFC 7143 §12.1), computed with SSE4.2 where available.

/// Digest of a PDU header (BHS plus AHS).
pub fn header(bhs_and_ahs: &[u8]) -> u32 {
    crc32c::crc32c(bhs_and_ahs)
}

/// Digest of a data segment and its padding, fed in pieces (the data may come from several
/// buffers).
pub fn data(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Digests travel little-endian on the wire (RFC 7143 §12.1: the CRC as computed, least
/// significant byte first), as every initiator expects.
pub fn to_wire(crc: u32) -> [u8; 4] {
    crc.to_le_bytes()
}

pub fn from_wire(b: [u8; 4]) -> u32 {
    u32::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3720_test_vectors() {
        // RFC 3720 B.4: 32 bytes of zeroes, of 0xFF, and an incrementing pattern.
        assert_eq!(header(&[0u8; 32]), 0x8A91_36AA);
        assert_eq!(header(&[0xFFu8; 32]), 0x62A8_AB43);
        let inc: Vec<u8> = (0..32).collect();
        assert_eq!(header(&inc), 0x46DD_794E);
    }

    #[test]
    fn pieces_equal_whole() {
        let v: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(data(&[&v[..333], &v[333..]]), header(&v));
        assert_eq!(from_wire(to_wire(0x1234_5678)), 0x1234_5678);
    }
}
