"""A fixed English word list, so the benchmark corpus is the same on every machine and needs no download.

NOTE: mostly common words (one WordPiece each for BERT-style vocabularies) plus a tail of long or
technical ones that split into several pieces, so token counts are not simply word counts.
"""

_TEXT = """
    the of and to in is was for on that with as by at from it be are this which or an have not
    they but one had were all their has been more there can we when who will would about also time
    into other some than only its new first two after may these people year years then most over
    such many where world made between city part used during both later well under number known
    work life before three while state through system water history school family group back since
    found same each name government much century high because several area any called early public
    however until second house large music include season national united began small river power
    form place team often around development without place against along country best based day
    four film member american english general local major given several important among next series
    north south east west book study building research service control model process data energy
    health market result example information question answer problem value level order point field
    center light line language church player women children father mother game light road station
    island union road club college program period rate price common human land body death force
    military design production report policy education change support position record evidence
    theory method science software network computer server memory request response latency token
    vector search index document passage query batch cache model engine signal pattern structure
    surface material metal glass stone wood paper cotton plant animal forest desert ocean mountain
    valley winter summer spring autumn morning evening night weather storm rain snow wind cloud sun
    moon star planet orbit gravity mass speed distance length height weight volume pressure heat
    temperature chemical reaction protein cell gene disease treatment patient doctor hospital drug
    law court judge trial case right freedom election party leader minister council committee vote
    trade money bank credit loan interest tax income cost profit company industry worker factory
    farm food bread rice fruit vegetable coffee tea milk sugar salt oil kitchen table chair window
    door wall floor roof garden street bridge tower castle temple museum library theatre stadium
    photosynthesis infrastructure thermodynamics electromagnetic microprocessor cryptography
    biodiversity constitutional archaeological parliamentary semiconductor interoperability
    quantization tokenization embeddings transformer attention normalization distributed
    asynchronous benchmark throughput concurrency retrieval augmented generation similarity
    quickly slowly carefully recently usually rarely always never sometimes together
"""

# NOTE: dict.fromkeys drops repeats but keeps the order, so the seeded choices never move.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_TEXT.split()))
